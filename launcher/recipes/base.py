"""What every recipe shares: the `Recipe` interface, its `Context`, and helpers over the client API.

A recipe trains one LoRA adapter through `framework`'s client API only (ServiceClient /
TrainingClient / SamplingClient and `framework.types`), so the same recipe runs against an
in-process engine or a server. The driver (`launcher.run`) owns the loop, checkpoints, resume and
tracking; a recipe says how to do one step and how to evaluate:

    recipe.prepare()                      # once per process (teachers, reference samplers, data)
    recipe.evaluate(step) -> metrics      # every `eval_every` steps, with the weights of `step`
    recipe.step(step, adam) -> metrics    # forward_backward(...) + optim_step(adam)

Everything a step does is a function of (config, step): data comes from `env.problems(step, n)` or
a seeded order over a file, sampling seeds from `step_seed(seed, step, i)`. A run resumed from the
checkpoint of step k therefore repeats exactly what the uninterrupted run did from step k on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from framework import ServiceClient, TrainingClient, types
from launcher.envs import Env, Problem


@dataclasses.dataclass
class Context:
    cfg: Any  # the composed DictConfig
    service: ServiceClient
    trainer: TrainingClient
    tokenizer: Any
    env: Env | None
    run_dir: Path
    base_model: str


class Recipe:
    """Base class: subclasses set the keys below and implement `step` (and `evaluate`)."""

    plot_keys: ClassVar[tuple[str, ...]] = ("loss",)  # the curves drawn in metrics.png
    progress_key: ClassVar[str] = "loss"  # shown on the progress bar
    final_key: ClassVar[str] = "eval/loss"  # the final evaluation's metric the run returns (for sweepers)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.trainer = ctx.trainer
        self.tokenizer = ctx.tokenizer
        self.env = ctx.env

    def prepare(self) -> dict[str, float]:
        """One-time setup; may return metrics to log with the first row."""
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def step(self, step: int, adam: types.AdamParams) -> dict[str, float]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------- helpers
def step_seed(seed: int, step: int, index: int = 0, purpose: str = "sample") -> int:
    """A 63-bit sampling seed that depends only on (seed, step, index, purpose)."""
    digest = hashlib.sha256(f"{purpose}/{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_conversation(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[float]]:
    """(tokens, mask): the whole chat, and 1.0 on the tokens of assistant turns (0.0 elsewhere).

    Each assistant turn's tokens are what rendering the chat up to and including that turn adds to
    rendering it up to the turn before (with the generation prompt): the template's own end-of-turn
    token is part of the turn, so the model learns to stop. Requires a template whose shorter
    renderings are prefixes of longer ones (true of Llama 3, Qwen2.5 and ours; a template that
    rewrites history, such as Qwen3's thinking, is refused with a clear error).
    """
    tokens: list[int] = []
    mask: list[float] = []
    for i, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        if is_assistant:
            prompt = encode_chat(tokenizer, messages[:i], add_generation_prompt=True)
            _extend(tokens, mask, prompt, 0.0, i)
        full = encode_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        _extend(tokens, mask, full, 1.0 if is_assistant else 0.0, i)
    return tokens, mask


def _extend(tokens: list[int], mask: list[float], rendered: list[int], weight: float, turn: int) -> None:
    if rendered[: len(tokens)] != tokens:
        raise ValueError(f"chat template: rendering turn {turn} changes the tokens of earlier turns, so assistant "
                         "tokens cannot be located; use a template whose renderings extend each other")
    new = rendered[len(tokens):]
    tokens.extend(new)
    mask.extend([weight] * len(new))


def stop_tokens(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the eos token and the template's end-of-turn token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    prompt = encode_chat(tokenizer, probe[:1], add_generation_prompt=True)
    full = encode_chat(tokenizer, probe, add_generation_prompt=False)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if full[: len(prompt)] == prompt:
        ids.update(next(([t] for t in full[len(prompt):] if t in special), []))
    if not ids:
        raise ValueError("the tokenizer has no eos token and its chat template no special end-of-turn token")
    return sorted(ids)


def answer_message(env: Env, problem: Problem) -> dict[str, str]:
    """The env's reference assistant turn (`answer_message` when it has one, else the bare answer)."""
    make = getattr(env, "answer_message", None)
    return make(problem) if make is not None else {"role": "assistant", "content": problem.answer}


def sequence_datum(prompt: list[int], completion: list[int], **per_token: Sequence[float]) -> types.Datum:
    """The datum that trains `completion` after `prompt`.

    model_input = prompt + completion[:-1], target_tokens = (prompt + completion)[1:]; each
    `per_token` array (one value per completion token) is placed on the completion positions and
    padded with 0 on the prompt positions, as tinker's RL losses expect.
    """
    tokens = prompt + completion
    n_prompt = len(prompt) - 1
    inputs: dict[str, Any] = {"target_tokens": np.asarray(tokens[1:], np.int64)}
    for key, values in per_token.items():
        if len(values) != len(completion):
            raise ValueError(f"{key} has {len(values)} values for {len(completion)} completion tokens")
        inputs[key] = np.concatenate([np.zeros(n_prompt, np.float32), np.asarray(values, np.float32)])
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def supervised_datum(tokens: list[int], mask: list[float], scale: float = 1.0) -> types.Datum:
    """Next-token cross-entropy datum with weights `mask * scale` on the predicted tokens."""
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": np.asarray(tokens[1:], np.int64),
        "weights": np.asarray(mask[1:], np.float32) * np.float32(scale)})


def decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=False)


def greedy_accuracy(sampler: Any, tokenizer: Any, env: Env, problems: Sequence[Problem], *, max_tokens: int,
                    stop: list[int]) -> float:
    """Mean reward of greedy (temperature 0) completions of `problems`: submit all, then wait."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop, seed=0)
    futures = [sampler.sample(types.ModelInput.from_ints(encode_chat(tokenizer, env.prompt_messages(p),
                                                                     add_generation_prompt=True)), 1, params)
               for p in problems]
    rewards = [env.grade(p, decode(tokenizer, f.result().sequences[0].tokens))
               for p, f in zip(problems, futures, strict=True)]
    return float(np.mean(rewards))


class OnPolicyRecipe(Recipe):
    """A recipe that samples from the policy it trains (`rl`, `distill`).

    Its config section (`cfg.<section>`) holds `problems_per_step`, `group_size`, `max_tokens`,
    `temperature` and `eval_problems`; evaluation is greedy accuracy on that many held-out problems.
    """

    section: ClassVar[str]
    final_key: ClassVar[str] = "eval/accuracy"

    @property
    def settings(self) -> Any:
        return self.cfg[self.section]

    def prepare(self) -> dict[str, float]:
        if self.env is None:
            raise ValueError(f"the {self.section} recipe needs an env")
        self.stop = stop_tokens(self.tokenizer)
        n = self.settings.eval_problems
        self.eval_set = self.env.eval_problems(n) if n > 0 else []
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.eval_set:
            return {}
        sampler = self.trainer.save_weights_and_get_sampling_client()
        return {"eval/accuracy": greedy_accuracy(sampler, self.tokenizer, self.env, self.eval_set,
                                                 max_tokens=self.settings.max_tokens, stop=self.stop)}

    def sample(self, step: int) -> tuple[list[Problem], list[list[int]], list[list[types.SampledSequence]]]:
        """Publish the current weights and sample `group_size` completions of each of step's problems.

        All requests are submitted before any is awaited, so the engine batches them; problem i's seed
        is `step_seed(seed, step, i)`. Returns (problems, prompt tokens, sampled sequences per problem).
        """
        s, tok = self.settings, self.tokenizer
        problems = self.env.problems(step, s.problems_per_step)
        sampler = self.trainer.save_weights_and_get_sampling_client()
        prompts = [encode_chat(tok, self.env.prompt_messages(p), add_generation_prompt=True) for p in problems]
        futures = [sampler.sample(types.ModelInput.from_ints(prompt), s.group_size, types.SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, stop=self.stop,
            seed=step_seed(self.cfg.seed, step, i))) for i, prompt in enumerate(prompts)]
        return problems, prompts, [f.result().sequences for f in futures]
