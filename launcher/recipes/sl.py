"""Chat SFT: conversations rendered with the tokenizer's chat template, loss on assistant tokens only.

Data, by `sl.data`:
- a chat JSONL file, one `{"messages": [{"role", "content"}, ...]}` per line; the package ships
  `launcher/data/arith_chat.jsonl` (400 arithmetic chats, one in four with two exchanges, made by
  `python -m launcher.recipes.sl launcher/data/arith_chat.jsonl`). Its last `sl.eval_size`
  conversations are held out. Batches walk the rest in a seeded order, reshuffled every epoch; the
  batch of step s depends only on (seed, s), so a resumed run sees the same batches;
- null: single-turn conversations made from the env (its prompt and reference answer), with the
  env's held-out problems as the eval set.

Weights are 1/(assistant tokens in the batch) on assistant tokens, so `loss` is the mean per-token
negative log-likelihood; `eval/loss` is the same on the held-out conversations (one `forward`).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from framework import types
from launcher.envs import Env
from launcher.jsonl import DataFileError, read_jsonl
from launcher.recipes.base import Recipe, answer_message, encode_conversation, supervised_datum

Conversation = list[dict[str, str]]


def load_chats(path: str | Path) -> list[Conversation]:
    """Conversations from a JSONL file; a bad line raises `DataFileError` naming the file and line."""
    chats = []
    for where, record in read_jsonl(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataFileError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFileError(f"{where}: the conversation has no assistant turn to train on")
        chats.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return chats


def env_chat(env: Env, problem: Any) -> Conversation:
    return [*env.prompt_messages(problem), answer_message(env, problem)]


def epoch_batch(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step `step`'s batch: a seeded permutation of range(n) per epoch, walked in order."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(position, n)
        order = list(range(n))
        random.Random(f"sl/seed={seed}/epoch={epoch}").shuffle(order)
        out.append(order[i])
    return out


def chat_datums(tokenizer: Any, chats: list[Conversation]) -> tuple[list[types.Datum], int]:
    """Datums with weights normalised to a per-token mean; returns (datums, assistant tokens)."""
    encoded = [encode_conversation(tokenizer, chat) for chat in chats]
    total = sum(sum(mask[1:]) for _, mask in encoded)
    scale = 1.0 / max(total, 1.0)
    return [supervised_datum(tokens, mask, scale) for tokens, mask in encoded], int(total)


class SLRecipe(Recipe):
    plot_keys: ClassVar[tuple[str, ...]] = ("loss", "eval/loss", "grad_norm", "time/step")
    progress_key: ClassVar[str] = "loss"
    final_key: ClassVar[str] = "eval/loss"

    def prepare(self) -> dict[str, float]:
        sl = self.cfg.sl
        if sl.data:
            chats = load_chats(sl.data)
            if not 0 <= sl.eval_size < len(chats):
                raise ValueError(f"sl.eval_size={sl.eval_size} must leave training data; {sl.data} has {len(chats)}")
            self.train_chats = chats[: len(chats) - sl.eval_size]
            eval_chats = chats[len(chats) - sl.eval_size:]
        else:
            if self.env is None:
                raise ValueError("sl.data is null and there is no env to make conversations from")
            self.train_chats = None
            eval_chats = [env_chat(self.env, p) for p in self.env.eval_problems(sl.eval_size)] if sl.eval_size else []
        self.eval_datums, _ = chat_datums(self.tokenizer, eval_chats) if eval_chats else ([], 0)
        return {}

    def batch(self, step: int) -> list[Conversation]:
        sl = self.cfg.sl
        if self.train_chats is None:
            return [env_chat(self.env, p) for p in self.env.problems(step, sl.batch_size)]
        return [self.train_chats[i] for i in epoch_batch(len(self.train_chats), sl.batch_size, step, self.cfg.seed)]

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.eval_datums:
            return {}
        out = self.trainer.forward(self.eval_datums, "cross_entropy").result()
        return {"eval/loss": out.metrics["loss:sum"]}

    def step(self, step: int, adam: types.AdamParams) -> dict[str, float]:
        datums, n_tokens = chat_datums(self.tokenizer, self.batch(step))
        t0 = time.perf_counter()
        fb = self.trainer.forward_backward(datums, "cross_entropy")
        optim = self.trainer.optim_step(adam)
        out, opt = fb.result(), optim.result()
        return {"loss": out.metrics["loss:sum"], "grad_norm": (opt.metrics or {}).get("grad_norm:mean", np.nan),
                "train_tokens": n_tokens, "time/train": time.perf_counter() - t0,
                "tokens": float(sum(d.model_input.length for d in datums))}


def make_env_chats(env: Env, n: int, *, two_turn_every: int = 4) -> list[Conversation]:
    """`n` conversations from `env.problems`; every `two_turn_every`-th has a second exchange."""
    chats = []
    for i in range(n):
        first, second = env.problems(i, 2)
        chat = env_chat(env, first)
        if two_turn_every and i % two_turn_every == two_turn_every - 1:
            chat += env_chat(env, second)
        chats.append(chat)
    return chats


def main(argv: list[str] | None = None) -> None:
    import argparse

    from launcher.envs.arithmetic import ArithmeticEnv

    parser = argparse.ArgumentParser(description="write arithmetic chats as a JSONL file for the sl recipe")
    parser.add_argument("out")
    parser.add_argument("-n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    chats = make_env_chats(ArithmeticEnv(seed=args.seed), args.n)
    Path(args.out).write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))


if __name__ == "__main__":
    main()
