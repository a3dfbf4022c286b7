"""The arithmetic environment: deterministic data order, a disjoint held-out set, grading."""

from __future__ import annotations

import pytest

from launcher.envs import Env, Problem
from launcher.envs.arithmetic import ArithmeticEnv, Difficulty, evaluate, is_held_out, parse_answer


def test_implements_the_env_protocol():
    env = ArithmeticEnv(seed=0)
    assert isinstance(env, Env)
    problem = env.problems(0, 1)[0]
    assert env.prompt_messages(problem) == [{"role": "user", "content": problem.question}]


def test_same_seed_and_step_give_the_same_problems():
    a, b = ArithmeticEnv(seed=3), ArithmeticEnv(seed=3)
    assert a.problems(7, 32) == b.problems(7, 32)
    assert a.problems(7, 8) == a.problems(7, 32)[:8]  # a prefix: batch size does not reorder the data
    assert a.problems(7, 32) != a.problems(8, 32)
    assert a.problems(7, 32) != ArithmeticEnv(seed=4).problems(7, 32)


def test_answers_are_correct():
    env = ArithmeticEnv(seed=0, difficulty=Difficulty(num_operands=3, max_digits=2, operators=("+", "-", "*")))
    for problem in env.problems(0, 200):
        expression = problem.question.removeprefix("What is ").removesuffix("?")
        assert int(problem.answer) == eval(expression)  # our generator's output only: safe
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([2, 3, 4], ["-", "-"]) == -5


def test_difficulty_controls_the_operands():
    env = ArithmeticEnv(seed=0, difficulty=Difficulty(num_operands=4, min_digits=3, max_digits=3, operators=["*"]))
    for problem in env.problems(0, 50):
        operands = problem.question.removeprefix("What is ").removesuffix("?").split(" * ")
        assert len(operands) == 4 and all(len(x) == 3 for x in operands)
    with pytest.raises(ValueError, match="operators"):
        Difficulty(operators=("/",))
    with pytest.raises(ValueError, match="digits"):
        Difficulty(min_digits=3, max_digits=2)


def test_eval_set_is_fixed_distinct_and_disjoint_from_training():
    env = ArithmeticEnv(seed=0)
    held_out = env.eval_problems(200)
    assert held_out == ArithmeticEnv(seed=1).eval_problems(200)  # independent of the seed
    assert len({p.question for p in held_out}) == 200 and all(map(is_held_out, held_out))
    train = {p.question for step in range(200) for p in env.problems(step, 64)}
    assert not train & {p.question for p in held_out}
    with pytest.raises(ValueError, match="held-out"):
        ArithmeticEnv(difficulty=Difficulty(min_digits=1, max_digits=1)).eval_problems(100)


@pytest.mark.parametrize(("completion", "reward"), [
    ("55", 1.0), (" 55", 1.0), ("\n 55 \n", 1.0), ("55<|end|>", 1.0), ("55<|end|>12", 1.0),
    ("55 apples, or 12", 1.0), ("The answer is 55.", 1.0),
    ("56", 0.0), ("5 5", 0.0), ("-55", 0.0), ("", 0.0), ("<|end|>55", 0.0), ("fifty-five", 0.0),
    ("\x00garbage", 0.0),
])
def test_grade(completion, reward):
    assert ArithmeticEnv().grade(Problem("What is 50 + 5?", "55"), completion) == reward


def test_negative_answers():
    env = ArithmeticEnv()
    problem = Problem("What is 3 - 10?", "-7")
    assert env.grade(problem, "-7<|end|>") == 1.0
    assert env.grade(problem, "7") == 0.0
    assert parse_answer("x") is None
