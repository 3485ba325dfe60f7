import pytest

from arca.tasks.arithmetic import arithmetic_problems
from arca.tasks.grading import math_reward


def test_seeded_distinct_and_self_consistent():
    a = arithmetic_problems(40, seed=3)
    assert a.equals(arithmetic_problems(40, seed=3))
    assert not a.equals(arithmetic_problems(40, seed=4))
    assert a["problem"].is_unique and a["prompt_id"].is_unique
    for solution, answer in zip(a["solution"], a["answer"]):
        assert math_reward(solution, answer) == 1.0


def test_operators_and_limits():
    df = arithmetic_problems(10, seed=0, operators=("-", "\\times"))
    assert df["problem"].str.contains("-|times").all()
    with pytest.raises(ValueError, match="operators"):
        arithmetic_problems(3, operators=("/",))
    with pytest.raises(ValueError, match="n: asked for 101"):
        arithmetic_problems(101)
