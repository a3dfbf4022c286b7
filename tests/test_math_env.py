"""The math word-problem env: loading (JSONL, parquet, bad files), the split, and math-verify grading."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.envs import Env, Problem
from launcher.envs.math import DEFAULT_PATH, DataFileError, MathEnv, load_problems, verify_answer


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_shipped_file_loads_and_every_reference_answer_grades_right():
    env = MathEnv()
    assert isinstance(env, Env)
    problems = load_problems(DEFAULT_PATH)
    assert len(problems) >= 50
    for p in problems:
        assert env.grade(p, env.answer_message(p)["content"]) == 1.0, p


@pytest.mark.parametrize(("gold", "completion", "right"), [
    ("42", "The answer is 42.", True),
    ("42", "42<|end|>", True),
    ("42", "\\boxed{42}", True),
    ("0.75", "It is 3/4.", True),
    ("3/4", "$\\frac{3}{4}$", True),
    ("1/2", "0.5", True),
    ("2.5", "The answer is 2.50", True),
    ("42", "The answer is 41.", False),
    ("42", "", False),
    ("42", "I do not know", False),
    ("7", "<|end|>7", False),  # nothing before the end-of-turn token
])
def test_math_verify_grading(gold, completion, right):
    assert verify_answer(gold, completion) is right


def test_split_is_fixed_disjoint_and_problems_are_a_function_of_the_step(tmp_path):
    env, other_seed = MathEnv(num_eval=10), MathEnv(seed=1, num_eval=10)
    held_out = {p.question for p in env.eval_problems(10)}
    assert held_out == {p.question for p in other_seed.eval_problems(10)}  # the split ignores the seed
    train = {p.question for s in range(50) for p in env.problems(s, 8)}
    assert not train & held_out
    assert env.problems(7, 8) == MathEnv(num_eval=10).problems(7, 8)
    assert env.problems(7, 8) != env.problems(8, 8) and env.problems(7, 8) != other_seed.problems(7, 8)
    assert len(set(env.problems(3, 20))) == 20  # no repeats within a step
    with pytest.raises(ValueError, match="num_eval"):
        env.eval_problems(11)


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "1+1?", "answer": 2', "not valid JSON"),
    ('["1+1?", "2"]', "expected a JSON object"),
    ('{"question": "1+1?"}', "'answer'"),
    ('{"question": "", "answer": "2"}', "'question'"),
    ('{"question": "1+1?", "answer": null}', "'answer'"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, line, message):
    good = json.dumps({"question": "What is 2 + 2?", "answer": 4})
    path = _write(tmp_path / "problems.jsonl", [good, "", good, line, good])
    with pytest.raises(DataFileError, match=message) as error:
        MathEnv(path)
    assert f"{path}:4:" in str(error.value)


def test_numbers_are_answers_and_missing_or_empty_files_fail(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps({"question": f"q{i}", "answer": i * 0.5}) for i in range(4)])
    assert load_problems(path)[3] == Problem("q3", "1.5")
    with pytest.raises(DataFileError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(DataFileError, match="no problems"):
        load_problems(_write(tmp_path / "empty.jsonl", ["", ""]))


def test_parquet(tmp_path):
    path = tmp_path / "problems.parquet"
    pq.write_table(pa.table({"question": ["What is 6 * 7?", "What is 1 + 1?", "What is 9 - 3?"],
                             "answer": ["42", "2", "6"], "source": ["a", "b", "c"]}), path)
    env = MathEnv(path, num_eval=1)
    assert len(env.problems(0, 2)) == 2 and len(env.eval_problems(1)) == 1
    pq.write_table(pa.table({"question": ["What is 6 * 7?", None], "answer": ["42", "2"]}), path)
    with pytest.raises(DataFileError, match=r"problems.parquet: row 2: field 'question'"):
        load_problems(path)


def test_prompt_is_one_user_turn():
    env = MathEnv()
    p = env.problems(0, 1)[0]
    (message,) = env.prompt_messages(p)
    assert message["role"] == "user" and message["content"].startswith(p.question)
