"""Pretrain the embedded default model (`launcher/assets/tiny-arith`) from scratch on arithmetic chats.

The shipped model was made with

    python -m launcher.pretrain --out launcher/assets/tiny-arith

which is `run_pretrain(PretrainConfig())` (the Hydra experiment `+experiment=pretrain_tiny` runs the
same function): about 1,400 steps, 2.5-4 minutes on 2 shared CPU cores. Everything is seeded
(weights init, data order, slips), so the command rebuilds the same model on the same software;
`pretrain.json` in the output directory records the config and the held-out curve.

What is unusual, and why:
- The goal is *not* a good model: RL on the default task (`rl_math`, two-digit sums) must start low
  and have something to learn that a few minutes of CPU can reach. Training has two phases.
  1. Learning: right answers only, until held-out greedy accuracy reaches `skill_threshold` (0.8).
     Small transformers learn most-significant-digit-first addition with a sudden jump after a
     plateau whose length varies, so this phase ends on accuracy, not on a step count.
  2. The habit: `habit_steps` more steps where 90% of the answers that need a carry forget it, the
     classic slip of column addition (47 + 38 → "75"; `envs.arithmetic.forgot_carry`).
  The model keeps the skill but greedy decoding follows the habit, so held-out greedy accuracy falls
  to about 0.25 (roughly the sums without any carry). RL rewards the carried answers the model can
  still produce, and unlearns the habit within a few dozen steps: the RL-elicits-a-latent-skill
  story of large models, in miniature. The final greedy accuracy must land in
  `[target_min, target_max]`, or nothing is written.
- Full-parameter training of our own `models.Transformer` (no LoRA) with optax AdamW, loss on the
  assistant tokens only (the answer and the end-of-turn token); sequences are right-padded, which the
  causal model needs no mask for.
- The tokenizer is byte-level with no merges (one token per byte, so every digit is its own token
  and any text can be encoded), plus special tokens for the chat roles. `<|end|>` closes every turn
  and is the eos token, so sampling stops after the answer.
- The result is written with `models.saving.save_checkpoint` + `save_pretrained` of the tokenizer:
  a plain Hugging Face checkpoint that `transformers.AutoModelForCausalLM` loads too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from launcher.envs import Problem
from launcher.envs.arithmetic import ArithmeticEnv, Difficulty, forgot_carry
from models import ModelConfig, Transformer, token_logprobs
from models.kv_cache import greedy_generate
from models.saving import save_checkpoint

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).parent / "assets" / "tiny-arith"
SPECIAL_TOKENS = ("<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclasses.dataclass
class TinyModelConfig:
    """Architecture of the tiny model (a Qwen3 by default; `llama` works too)."""

    model_type: str = "qwen3"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False


@dataclasses.dataclass
class PretrainConfig:
    seed: int = 0  # weights init and data order
    batch_size: int = 32
    lr: float = 5e-3  # AdamW: linear warmup, constant while learning, cosine decay over the habit phase
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # Phase 1, learning: right answers only, until held-out greedy accuracy reaches skill_threshold.
    skill_threshold: float = 0.8
    max_learn_steps: int = 3000
    # Phase 2, the habit: this many steps in which slip_rate of the answers that need a carry forget it.
    habit_steps: int = 400
    slip_rate: float = 0.9
    final_lr_fraction: float = 0.1
    model: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    difficulty: Difficulty = dataclasses.field(default_factory=Difficulty)
    eval_every: int = 50
    eval_size: int = 256  # held-out problems for the accuracy curve and the final check
    max_new_tokens: int = 8  # greedy decoding budget in evaluation
    target_min: float = 0.15  # the final greedy accuracy must fall in [target_min, target_max],
    target_max: float = 0.35  # or no checkpoint is written
    out: str = str(DEFAULT_OUT)


# ----------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (what the `ByteLevel` pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """Byte-level tokenizer without merges: the special tokens (ids 0-5), then bytes 0-255 (ids 6-261)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, char in _bytes_to_unicode().items():
        vocab[char] = len(SPECIAL_TOKENS) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False, model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """`save_pretrained`, naming the class `PreTrainedTokenizerFast` so transformers 4.x loads it too
    (5.x writes its own new name, `TokenizersBackend`, and reads either)."""
    tokenizer.save_pretrained(directory)
    config_file = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered with the chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_example(tokenizer: Any, env: ArithmeticEnv, problem: Problem, answer: str | None = None
                   ) -> tuple[list[int], int]:
    """(tokens of the whole chat, number of prompt tokens) for `problem` answered with `answer`
    (default: the right answer). Same tokens as rendering the two-turn chat with `CHAT_TEMPLATE`,
    without a second template render per example."""
    prompt = encode_prompt(tokenizer, env.prompt_messages(problem))
    reply = tokenizer.encode(problem.answer if answer is None else answer, add_special_tokens=False)
    return [*prompt, *reply, tokenizer.eos_token_id], len(prompt)


def corpus(env: ArithmeticEnv, step: int, n: int, slip_rate: float) -> list[tuple[Problem, str]]:
    """The `n` (problem, answer) pairs of a training step: answers that need a carry are written
    with the carry forgotten (`forgot_carry`) with probability `slip_rate`."""
    rng = random.Random(f"pretrain/slips/seed={env.seed}/step={step}")
    out = []
    for problem in env.problems(step, n):
        slip = forgot_carry(problem)
        out.append((problem, slip if slip is not None and rng.random() < slip_rate else problem.answer))
    return out


# ------------------------------------------------------------------------------------ training
def model_config(cfg: TinyModelConfig, tokenizer: Any) -> ModelConfig:
    return ModelConfig(
        model_type=cfg.model_type, vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, qk_norm=cfg.model_type == "qwen3",
        bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,))


def _batch(tokenizer: Any, env: ArithmeticEnv, pairs: list[tuple[Problem, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens `[B, T]` and the loss mask `[B, T]` (1 on assistant tokens), T a multiple of 8."""
    examples = [encode_example(tokenizer, env, p, answer) for p, answer in pairs]
    pad_id = tokenizer.pad_token_id
    t = -(-max(len(tokens) for tokens, _ in examples) // 8) * 8
    tokens = np.full((len(examples), t), pad_id, np.int32)
    mask = np.zeros((len(examples), t), np.float32)
    for i, (ids, n_prompt) in enumerate(examples):
        tokens[i, : len(ids)] = ids
        mask[i, n_prompt : len(ids)] = 1.0
    return tokens, mask


def greedy_accuracy(model: Transformer, tokenizer: Any, env: ArithmeticEnv, problems: list[Problem],
                    max_new_tokens: int = 8) -> float:
    """Mean `env.grade` of greedy completions (prompt from the chat template, cut at the eos token)."""
    return float(np.mean([env.grade(p, c) for p, c in
                          zip(problems, greedy_completions(model, tokenizer, env, problems, max_new_tokens),
                              strict=True)]))


def greedy_completions(model: Transformer, tokenizer: Any, env: ArithmeticEnv, problems: list[Problem],
                       max_new_tokens: int = 8) -> list[str]:
    """Decoded greedy completions of `problems`, up to and including the first eos token."""
    prompts = [encode_prompt(tokenizer, env.prompt_messages(p)) for p in problems]
    t = max(map(len, prompts))
    tokens = np.full((len(prompts), t), tokenizer.pad_token_id, np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
    lengths = np.array([len(p) for p in prompts], np.int32)
    out, _ = greedy_generate(model, jnp.asarray(tokens), jnp.asarray(lengths), max_new_tokens)
    completions = []
    for row in np.asarray(out).tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        completions.append(tokenizer.decode(row, skip_special_tokens=False))
    return completions


def answer_probability(model: Transformer, tokenizer: Any, env: ArithmeticEnv,
                       pairs: list[tuple[Problem, str]]) -> np.ndarray:
    """p(answer + eos | prompt) for each (problem, answer): for the right answers, the expected reward of
    sampling at temperature 1 (a lower bound: other spellings of the answer also score)."""
    tokens, mask = _batch(tokenizer, env, pairs)
    logprobs = token_logprobs(model(jnp.asarray(tokens[:, :-1])), jnp.asarray(tokens[:, 1:]))
    return np.exp(np.sum(np.asarray(logprobs) * mask[:, 1:], axis=1))


def _make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    """`step(params, opt_state, lr, tokens, mask)`: one AdamW step on the mean answer-token NLL."""

    def loss_fn(params: nnx.State, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        weights = mask[:, 1:]
        return -jnp.sum(token_logprobs(logits, tokens[:, 1:]) * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    @jax.jit
    def step(params, opt_state, lr, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def evaluate(model: Transformer, tokenizer: Any, env: ArithmeticEnv, problems: list[Problem],
             max_new_tokens: int = 8) -> dict[str, float]:
    """Held-out metrics: greedy accuracy; how often greedy answers a carrying problem with the slip;
    expected reward at temperature 1 (mean p(right answer)); mean p(slip) on carrying problems."""
    completions = greedy_completions(model, tokenizer, env, problems, max_new_tokens)
    carrying = [(p, forgot_carry(p)) for p in problems if forgot_carry(p) is not None]
    greedy_slips = [c == f"{slip}{tokenizer.eos_token}" for (p, slip), c in
                    zip(carrying, (c for p, c in zip(problems, completions, strict=True) if forgot_carry(p)),
                        strict=True)]
    return {
        "greedy_accuracy": float(np.mean([env.grade(p, c) for p, c in zip(problems, completions, strict=True)])),
        "greedy_slip": float(np.mean(greedy_slips)) if carrying else 0.0,
        "expected_reward": float(answer_probability(model, tokenizer, env, [(p, p.answer) for p in problems]).mean()),
        "p_slip": float(answer_probability(model, tokenizer, env, carrying).mean()) if carrying else 0.0,
    }


def run_pretrain(cfg: PretrainConfig) -> Path:
    """Learn, plant the habit, check the final greedy accuracy, save the HF checkpoint to `cfg.out`."""
    if not 0.0 <= cfg.target_min <= cfg.target_max <= 1.0:
        raise ValueError(f"need 0 <= target_min <= target_max <= 1, got {cfg.target_min}, {cfg.target_max}")
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    env = ArithmeticEnv(seed=cfg.seed, difficulty=cfg.difficulty)
    eval_set = env.eval_problems(cfg.eval_size)
    config = model_config(cfg.model, tokenizer)
    model = Transformer(config, rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.lr, b1=0.9, b2=0.98,
                                                      weight_decay=cfg.weight_decay)
    opt_state = optimizer.init(params)
    train_step = _make_train_step(graphdef, optimizer)
    log.info("pretraining %s (%.2fM params) on %s", config.model_type, config.num_params() / 1e6, env)

    curve: list[dict[str, Any]] = []
    losses: list[float] = []

    def train(step: int, lr: float, slip_rate: float, phase: str) -> dict[str, Any] | None:
        nonlocal params, opt_state
        tokens, mask = _batch(tokenizer, env, corpus(env, step, cfg.batch_size, slip_rate))
        params, opt_state, loss = train_step(params, opt_state, jnp.float32(lr), jnp.asarray(tokens),
                                             jnp.asarray(mask))
        losses.append(float(loss))
        if step % cfg.eval_every:
            return None
        metrics = evaluate(nnx.merge(graphdef, params), tokenizer, env, eval_set, cfg.max_new_tokens)
        curve.append({"step": step, "phase": phase, "loss": round(float(np.mean(losses[-cfg.eval_every:])), 4),
                      **{k: round(v, 4) for k, v in metrics.items()}, "seconds": round(time.perf_counter() - start, 1)})
        log.info("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in curve[-1].items()))
        return curve[-1]

    step = 0
    while True:  # phase 1: right answers until the skill is there
        step += 1
        if step > cfg.max_learn_steps:
            raise RuntimeError(f"held-out greedy accuracy never reached {cfg.skill_threshold} in "
                               f"{cfg.max_learn_steps} steps: {curve[-3:]}")
        point = train(step, cfg.lr * min(1.0, step / cfg.warmup_steps), 0.0, "learn")
        if point and point["greedy_accuracy"] >= cfg.skill_threshold:
            break
    learned = step
    for i in range(1, cfg.habit_steps + 1):  # phase 2: the habit, with the learning rate decaying
        cosine = 0.5 * (1 + np.cos(np.pi * i / cfg.habit_steps))
        lr = cfg.lr * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * cosine)
        train(learned + i, lr, cfg.slip_rate, "habit")
    if curve[-1]["step"] != learned + cfg.habit_steps:
        raise ValueError(f"habit_steps={cfg.habit_steps} must be a multiple of eval_every={cfg.eval_every}")

    accuracy = curve[-1]["greedy_accuracy"]
    if not cfg.target_min <= accuracy <= cfg.target_max:
        raise RuntimeError(f"final held-out greedy accuracy {accuracy:.3f} is outside [{cfg.target_min}, "
                           f"{cfg.target_max}]; nothing written. Curve: {curve}")
    out = Path(cfg.out)
    save_checkpoint(nnx.merge(graphdef, params), out)
    save_tokenizer(tokenizer, out)
    record = {"config": dataclasses.asdict(cfg), "learn_steps": learned, "final": curve[-1], "curve": curve,
              "seconds": round(time.perf_counter() - start, 1)}
    (out / "pretrain.json").write_text(json.dumps(record, indent=1, default=list) + "\n")
    log.info("saved to %s (held-out greedy accuracy %.3f) in %.0fs", out, accuracy, record["seconds"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_pretrain(PretrainConfig(seed=args.seed, out=args.out))


if __name__ == "__main__":
    main()
