"""Task environments: where problems come from and how completions are graded.

Every environment implements the small `Env` protocol below, so recipes (rl, sl, dpo, distill)
never care which task they run on. What an environment promises:

- `problems(step, n)` is a pure function of the environment's seed, `step` and `n`: a resumed run
  that asks for step 137 again gets exactly the problems the killed run got, with no iterator
  state to checkpoint.
- `eval_problems(n)` is a fixed held-out set, disjoint from anything `problems` can return.
- `grade(problem, completion)` returns a reward in [0, 1] for the model's decoded completion text
  (the tokens after the prompt, special tokens included or not).
- `prompt_messages(problem)` gives the chat messages; recipes render them with the tokenizer's
  chat template (`apply_chat_template(..., add_generation_prompt=True)`).

Environments: `arithmetic` (synthetic, `launcher.envs.arithmetic`) and `math` (word problems from a
local file, `launcher.envs.math`).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Problem:
    """One task instance: the question shown to the model and the reference answer (as text)."""

    question: str
    answer: str


@runtime_checkable
class Env(Protocol):
    """The interface every environment implements (see the module docstring for the contract)."""

    def problems(self, step: int, n: int) -> list[Problem]:
        """The `n` training problems of `step`, deterministic in (seed, step, n)."""
        ...

    def eval_problems(self, n: int) -> list[Problem]:
        """`n` held-out problems, disjoint from every training problem; the same on every call."""
        ...

    def grade(self, problem: Problem, completion: str) -> float:
        """Reward in [0, 1] for `completion`, the decoded text the model produced after the prompt."""
        ...

    def prompt_messages(self, problem: Problem) -> list[dict[str, str]]:
        """Chat messages (`{"role", "content"}`) that pose `problem`, for the tokenizer's chat template."""
        ...


__all__ = ["Env", "Problem"]
