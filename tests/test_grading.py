"""Tests for arca.grading: boxed extraction, math-verify equivalence, hostile inputs, threads, MATH-500."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest

from arca.grading import MAX_ANSWER_CHARS, accuracy_reward, extract_boxed, math_reward


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
