"""Math word problems from a local JSONL or parquet file, graded with `math-verify`.

Each record has a `question` and an `answer` (a string or a number: "42", "3/4", "0.75",
"\\frac{1}{2}"); other fields are ignored. The repository ships `launcher/data/math_small.jsonl`
(72 short problems written for this project), the default when no path is given. A record that
is not a JSON object, or lacks a non-empty question or answer, stops loading with an error naming
the file and the line (for parquet: the row).

Split: a fixed shuffle of the file (seeded by the file's content, not the run's seed) puts
`num_eval` problems in the held-out set; training problems are the rest. `problems(step, n)`
draws from them with a generator seeded by (seed, step), so a resumed run sees the same data.

Grading: `math_verify.verify(parse(answer), parse(completion))`, which extracts the final answer
from free text ("The answer is 12.", "\\boxed{0.75}", "x = 12") and compares it symbolically, so
"0.5", "1/2" and "\\frac{1}{2}" all match. Chat special tokens (`<|...|>`, `</s>`) are cut first.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from pathlib import Path

from launcher.envs import Problem
from launcher.jsonl import DataFileError, read_jsonl

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "math_small.jsonl"
INSTRUCTION = "Give the final answer as a number."
_SPECIAL = re.compile(r"<\|[^|]*\|>|</s>|<s>")


def load_problems(path: str | Path) -> list[Problem]:
    """Read `question`/`answer` records from a `.jsonl` (or `.json` lines) or `.parquet` file."""
    path = Path(path)
    if path.suffix == ".parquet" and path.is_file():
        return _load_parquet(path)
    problems = [_problem(record, where) for where, record in read_jsonl(path)]
    if not problems:
        raise DataFileError(f"{path}: no problems in the file")
    return problems


def _load_parquet(path: Path) -> list[Problem]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFileError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    rows = pq.read_table(path).to_pylist()
    if not rows:
        raise DataFileError(f"{path}: no problems in the file")
    return [_problem(r, f"{path}: row {i}") for i, r in enumerate(rows, start=1)]


def _problem(record: object, where: str) -> Problem:
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object with question and answer, got {type(record).__name__}")
    values = {}
    for key in ("question", "answer"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, str | int | float) or not str(value).strip():
            raise DataFileError(f"{where}: field {key!r} must be a non-empty string or number, got {value!r}")
        values[key] = str(value).strip()
    return Problem(question=values["question"], answer=values["answer"])


class MathEnv:
    """Word problems from a file; implements `launcher.envs.Env`."""

    def __init__(self, path: str | Path | None = None, seed: int = 0, num_eval: int = 16):
        self.path = Path(path) if path is not None else DEFAULT_PATH
        self.seed = int(seed)
        problems = load_problems(self.path)
        if not 0 <= num_eval < len(problems):
            raise ValueError(f"num_eval={num_eval} must leave training problems; {self.path} has {len(problems)}")
        digest = hashlib.sha256("\n".join(f"{p.question}\t{p.answer}" for p in problems).encode()).hexdigest()
        order = list(range(len(problems)))
        random.Random(f"math/split/{digest}").shuffle(order)
        self._eval = [problems[i] for i in order[:num_eval]]
        self._train = [problems[i] for i in order[num_eval:]]

    def __repr__(self) -> str:
        return f"MathEnv({self.path}, {len(self._train)} train / {len(self._eval)} eval, seed={self.seed})"

    def problems(self, step: int, n: int) -> list[Problem]:
        rng = random.Random(f"math/train/seed={self.seed}/step={step}")
        if n <= len(self._train):
            return rng.sample(self._train, n)
        return [rng.choice(self._train) for _ in range(n)]

    def eval_problems(self, n: int) -> list[Problem]:
        if n > len(self._eval):
            raise ValueError(f"asked for {n} eval problems; {self.path} holds out {len(self._eval)} (env.num_eval)")
        return self._eval[:n]

    def grade(self, problem: Problem, completion: str) -> float:
        return float(verify_answer(problem.answer, completion))

    def prompt_messages(self, problem: Problem) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{problem.question} {INSTRUCTION}"}]

    def answer_message(self, problem: Problem) -> dict[str, str]:
        """The reference assistant turn (supervised targets)."""
        return {"role": "assistant", "content": f"The answer is {problem.answer}."}


def verify_answer(gold: str, completion: str) -> bool:
    """Whether `completion`'s final answer equals `gold`, by `math-verify`."""
    from math_verify import parse, verify  # lazy: sympy takes a second to import

    text = _SPECIAL.split(completion, maxsplit=1)[0]
    # math-verify bounds its work with SIGALRM, which only the main thread may use.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    predicted = parse(text, parsing_timeout=timeout)
    if not predicted:
        return False
    return bool(verify(parse(gold, parsing_timeout=timeout), predicted, timeout_seconds=timeout))
