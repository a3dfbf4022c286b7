"""DPO on preference pairs built from the env: chosen = the reference answer, rejected = a wrong one.

For each problem the chosen reply is the env's reference assistant turn and the rejected reply the
same turn with the answer replaced by a nearby wrong number (checked wrong by `env.grade`). The
reference log-probabilities come from the base model (`compute_logprobs` on a base-model sampling
client), computed once per pair and carried in the datums (`ref_logprobs`, with `weights` marking
the reply's tokens), so the loss is a pure function of (datums, policy logprobs):

    margin = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))
    loss   = −mean log σ(β · margin)

It runs through `forward_backward_custom` with a JAX-traceable loss, i.e. inside the compiled
training step. Sequences are right-padded to a multiple of 32 tokens (padding has weight 0), so
every step has the same shapes and the step compiles once. Metrics: `dpo/accuracy` (fraction of
pairs with margin > 0) and `dpo/margin` (β · margin, the implicit reward margin), on the training
batch and on held-out pairs (`eval/…`).
"""

from __future__ import annotations

import random
import re
import time
from fractions import Fraction
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from framework import types
from launcher.envs import Problem
from launcher.recipes.base import Recipe, answer_message, encode_conversation

PAD_MULTIPLE = 32


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer near `answer` (an integer, decimal or fraction; else a changed string)."""
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    text = answer.strip()
    if re.fullmatch(r"-?\d+", text):
        return str(int(text) + delta)
    if re.fullmatch(r"-?\d*\.\d+", text):
        return str(round(float(text) + delta, 6))
    if re.fullmatch(r"-?\d+/\d+", text):
        value = Fraction(text) + Fraction(delta, int(text.split("/")[1]))
        return f"{value.numerator}/{value.denominator}"
    return text + str(abs(delta))


def dpo_loss(beta: float):
    """The DPO loss over datums ordered [chosen_0, rejected_0, chosen_1, ...] (JAX-traceable)."""

    def loss_fn(data: list[types.Datum], logprobs: list[jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        policy, ref = [], []
        for datum, lp in zip(data, logprobs, strict=True):
            w = datum.loss_fn_inputs["weights"].to_numpy()
            policy.append(jnp.sum(jnp.where(w > 0, lp, 0.0) * w))
            ref.append(float(np.sum(datum.loss_fn_inputs["ref_logprobs"].to_numpy() * w)))
        policy = jnp.stack(policy)
        ref = jnp.asarray(ref, jnp.float32)
        margin = (policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2])
        loss = -jnp.mean(jax.nn.log_sigmoid(beta * margin))
        return loss, {"dpo/accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
                      "dpo/margin": jnp.mean(beta * margin)}

    return loss_fn


class DPORecipe(Recipe):
    plot_keys: ClassVar[tuple[str, ...]] = ("loss", "eval/dpo_accuracy", "eval/dpo_margin", "dpo/accuracy",
                                            "dpo/margin", "time/step")
    progress_key: ClassVar[str] = "dpo/accuracy"
    final_key: ClassVar[str] = "eval/dpo_accuracy"

    def prepare(self) -> dict[str, float]:
        if self.env is None:
            raise ValueError("the dpo recipe needs an env to build preference pairs from")
        self.reference = self.ctx.service.create_sampling_client(base_model=self.ctx.base_model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.loss_fn = dpo_loss(self.cfg.dpo.beta)
        eval_problems = self.env.eval_problems(self.cfg.dpo.eval_pairs) if self.cfg.dpo.eval_pairs else []
        self.eval_datums = self.pair_datums(eval_problems, step=-1)  # reference logprobs computed once
        return {}

    def pairs(self, problems: list[Problem], step: int) -> list[tuple[list[dict], list[dict]]]:
        out = []
        for i, problem in enumerate(problems):
            rng = random.Random(f"dpo/seed={self.cfg.seed}/step={step}/{i}")
            chosen = answer_message(self.env, problem)
            for _ in range(20):
                wrong = wrong_answer(problem.answer, rng)
                content = chosen["content"].replace(problem.answer, wrong) if problem.answer in chosen["content"] \
                    else wrong
                if not self.env.grade(problem, content):
                    break
            else:
                raise ValueError(f"could not make a wrong answer for {problem}")
            prompt = list(self.env.prompt_messages(problem))
            out.append(([*prompt, chosen], [*prompt, {"role": "assistant", "content": content}]))
        return out

    def pair_datums(self, problems: list[Problem], step: int) -> list[types.Datum]:
        """[chosen_0, rejected_0, ...] datums padded to one length, with `weights` and `ref_logprobs`."""
        encoded = [encode_conversation(self.tokenizer, chat) for pair in self.pairs(problems, step) for chat in pair]
        if not encoded:
            return []
        futures = [self.reference.compute_logprobs(types.ModelInput.from_ints(tokens)) for tokens, _ in encoded]
        n = -(-max(len(tokens) - 1 for tokens, _ in encoded) // PAD_MULTIPLE) * PAD_MULTIPLE
        datums = []
        for (tokens, mask), future in zip(encoded, futures, strict=True):
            ref = np.nan_to_num(np.asarray([np.nan if x is None else x for x in future.result()][1:], np.float32))
            pad = n - (len(tokens) - 1)
            datums.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1] + [self.pad_id] * pad),
                                      loss_fn_inputs={
                                          "target_tokens": np.asarray(tokens[1:] + [self.pad_id] * pad, np.int64),
                                          "weights": np.pad(np.asarray(mask[1:], np.float32), (0, pad)),
                                          "ref_logprobs": np.pad(ref * np.asarray(mask[1:], np.float32), (0, pad))}))
        return datums

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.eval_datums:
            return {}
        out = self.trainer.forward(self.eval_datums, "cross_entropy").result()
        policy = np.array([np.sum(o["logprobs"].to_numpy() * d.loss_fn_inputs["weights"].to_numpy())
                           for o, d in zip(out.loss_fn_outputs, self.eval_datums, strict=True)])
        ref = np.array([np.sum(d.loss_fn_inputs["ref_logprobs"].to_numpy()) for d in self.eval_datums])
        margin = (policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2])
        return {"eval/dpo_accuracy": float(np.mean(margin > 0)),
                "eval/dpo_margin": float(np.mean(self.cfg.dpo.beta * margin))}

    def step(self, step: int, adam: types.AdamParams) -> dict[str, Any]:
        datums = self.pair_datums(self.env.problems(step, self.cfg.dpo.batch_size), step)
        t0 = time.perf_counter()
        fb = self.trainer.forward_backward_custom(datums, self.loss_fn)
        optim = self.trainer.optim_step(adam)
        out, opt = fb.result(), optim.result()
        return {"loss": out.metrics["loss:sum"], "dpo/accuracy": out.metrics["dpo/accuracy"],
                "dpo/margin": out.metrics["dpo/margin"], "grad_norm": (opt.metrics or {}).get("grad_norm:mean"),
                "time/train": time.perf_counter() - t0, "tokens": float(sum(d.model_input.length for d in datums))}
