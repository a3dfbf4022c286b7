"""Synthetic arithmetic: "What is 47 + 8?" → "55", seeded, with configurable difficulty.

Problems are drawn by Python's `random.Random` seeded with a string that names the env seed and the
step, so `problems(step, n)` needs no state and a resumed run sees the same data order (string seeds
hash with SHA-512, stable across Python versions and platforms).

Held-out split: a problem belongs to the eval partition when the CRC32 of its question is divisible
by `EVAL_MODULUS`. Training draws skip that partition, so no seed and no step can ever train on an
eval problem; the eval set is a function of the difficulty only, the same for every seed, so runs
with different seeds are scored on the same problems.

Grading reads the first integer of the completion before any chat special token (`<|...`), after
whitespace: "55", " 55<|end|>", "55 apples" are right; "5 5", "fifty-five" and "" are wrong.
"""

from __future__ import annotations

import dataclasses
import random
import re
import zlib

from launcher.envs import Problem

OPERATORS: tuple[str, ...] = ("+", "-", "*")
EVAL_MODULUS = 10  # one problem in ten (by question hash) is held out
_STOP_MARKERS = ("<|", "</s>")
_INTEGER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard the problems are.

    Each operand first draws its digit count uniformly from [min_digits, max_digits], then a value
    uniformly among numbers with that many digits (0-9 for one digit), so short operands are as
    common as long ones. Operators are drawn uniformly from `operators` and evaluated with the usual
    precedence (`*` before `+`/`-`); answers may be negative.
    """

    num_operands: int = 2
    min_digits: int = 2
    max_digits: int = 2
    operators: tuple[str, ...] = ("+",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "operators", tuple(self.operators))  # lists from YAML configs
        if self.num_operands < 2:
            raise ValueError(f"Difficulty.num_operands must be >= 2, got {self.num_operands}")
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise ValueError(f"Difficulty needs 1 <= min_digits <= max_digits <= 9, got "
                             f"min_digits={self.min_digits}, max_digits={self.max_digits}")
        bad = [op for op in self.operators if op not in OPERATORS]
        if not self.operators or bad:
            raise ValueError(f"Difficulty.operators must be a non-empty subset of {OPERATORS}, got {self.operators!r}")


def evaluate(operands: list[int], operators: list[str]) -> int:
    """`operands[0] op0 operands[1] op1 ...` with `*` binding tighter than `+` and `-`."""
    terms, signs = [operands[0]], [1]
    for op, value in zip(operators, operands[1:], strict=True):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def parse_answer(completion: str) -> int | None:
    """The first integer in `completion` before any stop marker, or None."""
    for marker in _STOP_MARKERS:
        completion = completion.split(marker, 1)[0]
    match = _INTEGER.search(completion)
    return int(match.group()) if match else None


class ArithmeticEnv:
    """Arithmetic problems posed as one user turn; implements `launcher.envs.Env`."""

    def __init__(self, seed: int = 0, difficulty: Difficulty | None = None):
        self.seed = int(seed)
        self.difficulty = difficulty or Difficulty()

    def __repr__(self) -> str:
        return f"ArithmeticEnv(seed={self.seed}, difficulty={self.difficulty})"

    # ------------------------------------------------------------------------------ problems
    def problems(self, step: int, n: int) -> list[Problem]:
        rng = random.Random(f"arithmetic/train/seed={self.seed}/step={step}")
        out = []
        while len(out) < n:
            problem = self._draw(rng)
            if not is_held_out(problem):
                out.append(problem)
        return out

    def eval_problems(self, n: int) -> list[Problem]:
        """`n` distinct held-out problems (independent of the seed, fixed for a difficulty)."""
        rng = random.Random(f"arithmetic/eval/{self.difficulty}")
        seen: dict[str, Problem] = {}
        for _ in range(1000 + 200 * n):
            if len(seen) == n:
                break
            problem = self._draw(rng)
            if is_held_out(problem):
                seen.setdefault(problem.question, problem)
        if len(seen) < n:
            raise ValueError(f"{self.difficulty} has fewer than {n} distinct held-out problems "
                             f"(found {len(seen)}); ask for fewer or make the task harder")
        return list(seen.values())

    def _draw(self, rng: random.Random) -> Problem:
        d = self.difficulty
        operands = []
        for _ in range(d.num_operands):
            digits = rng.randint(d.min_digits, d.max_digits)
            low = 0 if digits == 1 else 10 ** (digits - 1)
            operands.append(rng.randint(low, 10**digits - 1))
        operators = [rng.choice(d.operators) for _ in range(d.num_operands - 1)]
        expression = str(operands[0]) + "".join(f" {op} {v}" for op, v in zip(operators, operands[1:], strict=True))
        return Problem(question=f"What is {expression}?", answer=str(evaluate(operands, operators)))

    # ------------------------------------------------------------------------------- grading
    def grade(self, problem: Problem, completion: str) -> float:
        value = parse_answer(completion)
        return float(value is not None and value == int(problem.answer))

    def prompt_messages(self, problem: Problem) -> list[dict[str, str]]:
        return [{"role": "user", "content": problem.question}]

    def answer_message(self, problem: Problem) -> dict[str, str]:
        """The reference assistant turn (supervised targets for pretraining and SFT)."""
        return {"role": "assistant", "content": problem.answer}


def forgot_carry(problem: Problem) -> str | None:
    """The answer with every carry forgotten (47 + 38 → "75", 95 + 18 → "3"), or None.

    The classic slip of column addition: each column keeps only the last digit of its sum, so the
    result is the digit-wise sum modulo 10. None when that is the right answer (no carry) or the
    problem is not a pure sum. Pretraining plants this habit for RL to unlearn; a DPO recipe can
    use it as the rejected answer.
    """
    parts = problem.question.removeprefix("What is ").removesuffix("?").split(" + ")
    if not all(part.isdigit() for part in parts):
        return None
    operands = [int(part) for part in parts]
    width = max(len(part) for part in parts)
    slip = sum(sum(v // 10**i % 10 for v in operands) % 10 * 10**i for i in range(width))
    return None if slip == sum(operands) else str(slip)


def is_held_out(problem: Problem) -> bool:
    """Whether `problem` is in the eval partition (never returned by `problems`)."""
    return zlib.crc32(problem.question.encode()) % EVAL_MODULUS == 0
