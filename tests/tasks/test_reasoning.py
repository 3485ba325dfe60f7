"""arca.tasks.reasoning: seeded distinct multi-step problems whose worked steps compute the answer, graded 1 by
the training grader; and stages.prepare holds its eval set out of training and keeps few-shot problems out."""

from __future__ import annotations

import re

import pytest

from arca.tasks.grading import math_reward
from arca.tasks.reasoning import count_problems, reasoning_problems, worked_solution
from stages.prepare import build_tables
from stages.schema import validate
from stages.strict import ParamsError
from tests.params import default_params

STEP = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)\.")


def _check_steps(problem: str, solution: str, answer: str, allow_negative: bool) -> None:
    """Every step is true arithmetic, chains from the previous result, and the last result is the answer."""
    tokens = problem.removeprefix("What is $").removesuffix("$?").split(" ")
    operands, ops = [int(t) for t in tokens[::2]], tokens[1::2]
    steps = STEP.findall(solution)
    assert len(steps) == len(ops) >= 2
    total = operands[0]
    for (left, op, right, result), want_op, want_right in zip(steps, ops, operands[1:]):
        assert (int(left), op, int(right)) == (total, want_op, want_right)
        total = total + want_right if op == "+" else total - want_right
        assert int(result) == total and (allow_negative or total >= 0)
    assert solution.endswith(f"The answer is \\boxed{{{total}}}.") and answer == str(total)


@pytest.mark.parametrize(
    "kwargs", [{}, {"max_operands": 5, "allow_negative": True}, {"min_operands": 4, "max_operands": 4}]
)
def test_seeded_distinct_and_the_worked_steps_compute_the_answer(kwargs):
    table = reasoning_problems(60, seed=3, **kwargs)
    assert table.equals(reasoning_problems(60, seed=3, **kwargs))
    assert not table.equals(reasoning_problems(60, seed=4, **kwargs))
    assert table["problem"].is_unique and table["prompt_id"].is_unique
    assert list(table.columns) == ["prompt_id", "source", "split", "subject", "level", "problem", "solution", "answer"]
    for row in table.itertuples():
        _check_steps(row.problem, row.solution, row.answer, kwargs.get("allow_negative", False))
        assert math_reward(row.solution, row.answer) == 1.0
        assert math_reward(row.solution.replace(f"{{{row.answer}}}", f"{{{int(row.answer) + 1}}}"), row.answer) == 0
    levels = set(table["level"])
    assert levels == set(range(kwargs.get("min_operands", 3) - 1, kwargs.get("max_operands", 3)))
    if kwargs.get("allow_negative"):
        assert (table["answer"].astype(int) < 0).any()


def test_counts_are_exact_and_limits_fail_clearly():
    assert count_problems(2, allow_negative=True) == 10 * 10 * 2
    assert count_problems(2) == 100 + 55  # a - b >= 0: 55 pairs
    assert count_problems(3, max_operand=1) == len(reasoning_problems(count_problems(3, max_operand=1), max_operand=1))
    with pytest.raises(ValueError, match="n: asked for 9 problems but only 8"):
        reasoning_problems(9, min_operands=2, max_operands=2, max_operand=1, allow_negative=True)
    with pytest.raises(ValueError, match="min_operands"):
        reasoning_problems(3, min_operands=1)
    with pytest.raises(ValueError, match="ops"):
        worked_solution([1, 2], ["+", "-"])
    assert worked_solution([3, 4, 5], ["+", "-"]) == ("3 + 4 = 7. 7 - 5 = 2. The answer is \\boxed{2}.", 2)


SHOT_ROW = reasoning_problems(3, seed=0).iloc[2]  # a problem the seed-0 draw yields early, so it must be dropped
SHOT = SHOT_ROW["problem"]
PROMPT = {"system": "Box it.", "few_shot": [{"problem": SHOT, "answer": SHOT_ROW["solution"]}]}
DATA = {
    "source": "embedded",
    "train": {"source": "reasoning", "n": 40, "seed": 0},
    "eval": {"reasoning": {"n": 30}},
    "probe": {"n": 2},
}


def test_prepare_holds_the_eval_set_out_and_excludes_the_few_shot_problems():
    train, eval_df, counts = build_tables(DATA, PROMPT)
    assert len(train) == 40 and len(eval_df) == 30 and counts["rows"] == {"train": 40, "reasoning": 30}
    assert set(train["problem"]).isdisjoint(eval_df["problem"])
    assert SHOT not in set(train["problem"]) | set(eval_df["problem"])
    assert set(eval_df["eval_set"]) == {"reasoning"} and set(eval_df["split"]) == {"test"}
    assert (train["source"] == "reasoning").all() and train["answer"].tolist() == [
        str(int(s.split("{")[-1].split("}")[0])) for s in train["solution"]
    ]
    assert [m["role"] for m in train["prompt"].iloc[0]] == ["system", "user", "assistant", "user"]
    smaller, fewer, _ = build_tables({**DATA, "eval": {"reasoning": {"n": 5}}}, PROMPT)  # eval appends to the draw
    assert smaller["problem"].tolist() == train["problem"].tolist()
    assert fewer["problem"].tolist() == eval_df["problem"].tolist()[:5]


def test_prepare_names_the_keys_when_the_source_runs_out():
    with pytest.raises(ParamsError, match=r"`data\.eval\.reasoning\.n`: Input should be a valid integer"):
        validate(default_params({"data": {"eval": {"reasoning": {"n": None}}}}))
    too_many = {**DATA, "train": {**DATA["train"], "n": 2600}}
    with pytest.raises(
        ValueError, match=r"data\.train\.n \(2600\) \+ data\.eval\.reasoning\.n \(30\) ask for too many"
    ):
        build_tables(too_many, PROMPT)
