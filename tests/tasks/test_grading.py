"""Tests for arca.tasks.grading: boxed extraction, math-verify equivalence, the paper's `exact` grader, hostile inputs,
threads, MATH-500, the grader registry."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest

from arca.tasks.grading import (
    GRADERS,
    MAX_ANSWER_CHARS,
    REWARD_FUNCS,
    accuracy_reward,
    exact_accuracy_reward,
    exact_reward,
    extract_boxed,
    math_reward,
    normalize_exact,
    reward_function,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\fbox{7}", "7"),
        (r"\boxed {42}", "42"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{1} and finally \fbox{3}", "3"),
        (r"\boxed{}", ""),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
        (r"\boxed{a_{b_{c}}}", "a_{b_{c}}"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    ["no box here 45", r"\boxed{\frac{1}{2}", r"\boxed{1} then cut off \boxed{2", r"\boxed 5", ""],
)
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        (r"\boxed{\frac12}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{\dfrac{1}{2}}", r"\frac12"),
        (r"\boxed{x=3}", "3"),  # decision: a `symbol = value` answer is graded by its value
        (r"\boxed{3}", "x=3"),
        (r"\boxed{[-2, 5)}", "[-2,5)"),
        (r"\boxed{30^\circ}", "30"),
        (r"\boxed{30}", r"30^\circ"),
        (r"\boxed{\$18}", "18"),
        (r"\boxed{5 \text{ cm}}", "5"),
        (r"\boxed{\text{(C)}}", r"\text{(C)}"),
        (r"\boxed{x^2+2x+1}", "(x+1)^2"),
        (r"Reasoning... so the answer is $\boxed{2}$.", r"We get $\boxed{2}$."),  # reference as solution
    ],
)
def test_math_reward_equivalent(completion, reference):
    assert math_reward(completion, reference) == 1.0


@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        (r"\boxed{2}", "3"),
        (r"\boxed{(1,2)}", "(1,2]"),
        (r"\boxed{y=3}", "x=3"),
        (r"\boxed{}", "3"),
        (r"\boxed{0.333}", r"\frac13"),
        ("The answer is 45, i.e. $45$.", "45"),  # right number, but never boxed
        (r"The answer is 45 \boxed{45", "45"),  # unterminated
        (r"\boxed{45} but really \boxed{44}", "45"),  # last box wins
    ],
)
def test_math_reward_wrong(completion, reference):
    assert math_reward(completion, reference) == 0.0


def test_math_reward_length_cap():
    long_sum = "+".join(["1"] * (MAX_ANSWER_CHARS // 2 + 1))
    assert math_reward(rf"\boxed{{{long_sum}}}", str(MAX_ANSWER_CHARS // 2 + 1)) == 0.0
    short_sum = "+".join(["1"] * 50)
    assert math_reward(rf"\boxed{{{short_sum}}}", "50") == 1.0


HOSTILE = [
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_001,  # 10k nested braces, terminated
    "\\boxed{" * 10_000,  # 10k unterminated boxes
    "x " * 25_000 + "\\boxed{" + "{" * 10_000,  # 50k characters then an unterminated deep box
    "\\" * 50_000,
    r"\boxed{9^{9^{9^{9}}}}",  # exact evaluation would never finish
    r"\boxed{(10^{9})!}",
    r"\boxed{\prod_{i=1}^{10^{9}} i}",
    r"\boxed{(a+b+c+d+e+f)^{12}}",  # expansion takes minutes
]


def _grade_in_thread(completions: list[str], reference: str, timeout_s: float) -> list[float]:
    results: list[float] = []

    def worker() -> None:
        results.extend(math_reward(c, reference) for c in completions)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"grading did not finish within {timeout_s} s"
    return results


@pytest.mark.parametrize("completion", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_is_fast_in_a_thread(completion):
    start = time.perf_counter()
    assert _grade_in_thread([completion], "3", timeout_s=10) == [0.0]
    assert time.perf_counter() - start < 3


def test_worker_thread_grades():
    assert _grade_in_thread([r"\boxed{\frac{1}{2}}", r"\boxed{3}"], "0.5", timeout_s=20) == [1.0, 0.0]


def test_accuracy_reward_strings_and_messages():
    completions = [r"so \boxed{4}", [{"role": "assistant", "content": r"\boxed{5}"}], "4", []]
    rewards = accuracy_reward(completions=completions, answer=["4", "4", "4", "4"], prompts=["p"] * 4)
    assert rewards == [1.0, 0.0, 0.0, 0.0]
    assert accuracy_reward.__name__ == "accuracy"
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(completions=["a", "b"], answer=["1"])


def test_grading_is_deterministic():
    completion, reference = r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}"
    assert {math_reward(completion, reference) for _ in range(3)} == {1.0}


def test_math500_references_grade_themselves(shared_data):
    path = shared_data / "math500" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 500
    failures = [r["unique_id"] for r in rows if math_reward(r["solution"], r["answer"]) != 1.0]
    assert failures == []
    # Another problem's answer, unless the two answers are equivalent (checked with the answers alone).
    wrong = 0
    for row, other in itertools.pairwise(rows[:101]):
        if math_reward(rf"\boxed{{{other['answer']}}}", row["answer"]) == 0.0:
            wrong += 1
            assert math_reward(row["solution"], other["answer"]) == 0.0, row["unique_id"]
    assert wrong >= 95


# ---- exact (the paper's grader, SPEC 7) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("  3  ", "3"),
        ("x  =\n 3", "x = 3"),  # whitespace runs collapse to one space
        ("5.", "5"),
        ("5..", "5"),  # every trailing period, as the paper's rstrip(".")
        ("5 .", "5"),  # collapse, drop the period, strip again
        (r"\left( 3, \frac{\pi}{2} \right)", r"( 3, \frac{\pi}{2} )"),
        (r"10\,000", "10000"),
        (r"a\;b\!c", "abc"),
        (r"5 \text{ cm}", "5 { cm}"),  # only the command goes: its braces stay, as in the paper
        (r"\text{(C)}", "{(C)}"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\tfrac{3}{4}", r"\frac{3}{4}"),
        (r"\textbf{A}", "bf{A}"),  # `\text` is removed wherever it occurs, as the paper's str.replace does
        (r"\leftarrow", "arrow"),
        ("ABC", "ABC"),  # no lowercasing
        (r"30^\circ", r"30^\circ"),
    ],
)
def test_normalize_exact(answer, normalized):
    assert normalize_exact(answer) == normalized


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        (r"so $\boxed{\dfrac{1}{2}}$.", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac12}", r"\frac{1}{2}", 0.0),  # math-verify says equal; exact does not
        (r"\boxed{0.5}", r"\frac{1}{2}", 0.0),
        (r"\boxed{x=3}", "3", 0.0),
        (r"\boxed{5}", r"We get $\boxed{5}$.", 1.0),  # reference as a whole solution: its last box
        (r"\boxed{\left[ -2, 5 \right)}", r"[ -2, 5 )", 1.0),
        (r"\boxed{10\,000.}", "10000", 1.0),
        (r"\boxed{\text{(C)}}", r"\text{(C)}", 1.0),
        (r"\boxed{(C)}", r"\text{(C)}", 0.0),  # `\text{(C)}` normalizes to `{(C)}`
        (r"\boxed{}", "3", 0.0),
        ("the answer is 3", "3", 0.0),  # no box, no credit
        (r"\boxed{3", "3", 0.0),  # unterminated
        (r"\boxed{2} then \boxed{3}", "3", 1.0),
    ],
)
def test_exact_reward(completion, reference, expected):
    assert exact_reward(completion, reference) == expected


def test_registries_and_trl_reward_functions():
    assert GRADERS == {"math_verify": math_reward, "exact": exact_reward}
    assert REWARD_FUNCS == {"math_verify": accuracy_reward, "exact": exact_accuracy_reward}
    assert reward_function("exact") is exact_accuracy_reward
    with pytest.raises(ValueError, match=r"train\.grader must be one of math_verify, exact, got 'sympy'"):
        reward_function("sympy")
    completions = [r"\boxed{\frac12}", [{"role": "assistant", "content": r"\boxed{\dfrac{1}{2}}"}]]
    assert exact_accuracy_reward(completions=completions, answer=[r"\frac{1}{2}"] * 2) == [0.0, 1.0]
    assert accuracy_reward(completions=completions, answer=[r"\frac{1}{2}"] * 2) == [1.0, 1.0]
    assert exact_accuracy_reward.__name__ == "accuracy_exact"
    with pytest.raises(ValueError, match="answer"):
        exact_accuracy_reward(completions=["a", "b"], answer=["1"])


def test_exact_on_math_references(shared_data):
    """Every MATH-500 solution earns its given `answer` under `exact` too, so its `answer` field and the box of its
    solution are interchangeable references for this grader."""
    path = shared_data / "math500" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [r["unique_id"] for r in rows if exact_reward(r["solution"], r["answer"]) != 1.0] == []
    assert all(normalize_exact(extract_boxed(r["solution"])) for r in rows)
