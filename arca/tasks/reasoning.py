"""A seeded, verifiable source of multi-step arithmetic problems with worked steps: "What is $3 + 4 - 5$?",
solved as `3 + 4 = 7. 7 - 5 = 2. The answer is \\boxed{2}.`

Why: the one-digit additions of `arca.tasks.arithmetic` give ~11-token completions, nothing to assign credit over.
Chaining operands makes the embedded 135M model write every intermediate result (~30 tokens), and one wrong
step decides the reward, so token-level credit has something to find. Operands are one digit, `+` and `-`, and
by default no intermediate result goes below zero (SmolLM2-135M rarely gets a negative step right).
"""

from __future__ import annotations

import hashlib
import random

import pandas as pd

OPERATORS = ("+", "-")


def _apply(total: int, op: str, value: int) -> int:
    return total + value if op == "+" else total - value


def worked_solution(operands: list[int], ops: list[str]) -> tuple[str, int]:
    """(the worked steps ending in `\\boxed{answer}`, the answer): one sentence per operator, left to right.

    Args:
        operands: k >= 2 integers.
        ops: k - 1 operators, each "+" or "-".
    """
    if len(ops) != len(operands) - 1 or len(operands) < 2:
        raise ValueError(f"ops: need len(operands) - 1 = {len(operands) - 1} operators, got {len(ops)}")
    total, steps = operands[0], []
    for op, value in zip(ops, operands[1:]):
        result = _apply(total, op, value)
        steps.append(f"{total} {op} {value} = {result}.")
        total = result
    return " ".join(steps) + f" The answer is \\boxed{{{total}}}.", total


def count_problems(operands: int, max_operand: int = 9, allow_negative: bool = False) -> int:
    """How many distinct problems with `operands` operands exist (for a clear error before sampling).

    Counted by dynamic programming over the running total, so it is exact with or without the no-negative rule.
    """
    totals = dict.fromkeys(range(max_operand + 1), 1)  # running total -> number of prefixes reaching it
    for _ in range(operands - 1):
        nxt: dict[int, int] = {}
        for total, count in totals.items():
            for op in OPERATORS:
                for value in range(max_operand + 1):
                    result = _apply(total, op, value)
                    if allow_negative or result >= 0:
                        nxt[result] = nxt.get(result, 0) + count
        totals = nxt
    return sum(totals.values())


def _draw(rng: random.Random, k: int, max_operand: int, allow_negative: bool) -> tuple[list[int], list[str]]:
    """One problem with k operands; with `allow_negative=False` each operand is drawn so the total stays >= 0."""
    operands, ops = [rng.randint(0, max_operand)], []
    total = operands[0]
    for _ in range(k - 1):
        op = rng.choice(OPERATORS)
        high = max_operand if (op == "+" or allow_negative) else min(total, max_operand)
        value = rng.randint(0, high)
        operands.append(value)
        ops.append(op)
        total = _apply(total, op, value)
    return operands, ops


def reasoning_problems(
    n: int,
    seed: int = 0,
    min_operands: int = 3,
    max_operands: int = 3,
    max_operand: int = 9,
    allow_negative: bool = False,
) -> pd.DataFrame:
    """`n` distinct problems in the normalized problem-table layout (as `arca.tasks.arithmetic`), worked solutions.

    Args:
        n: number of problems (at most the number of distinct ones, `count_problems` summed over the range).
        seed: the only source of randomness; the same seed gives the same table.
        min_operands, max_operands: each problem's operand count is drawn uniformly from this range (>= 2).
        max_operand: operands are drawn from 0..max_operand.
        allow_negative: whether intermediate results and answers may be negative.

    Returns:
        Columns prompt_id, source ("reasoning"), split ("train"), subject, level (the number of steps),
        problem, solution (every intermediate result, then `\\boxed{answer}`), answer.
    """
    if not 2 <= min_operands <= max_operands:
        raise ValueError(f"min_operands, max_operands: need 2 <= min <= max, got {min_operands}, {max_operands}")
    space = sum(count_problems(k, max_operand, allow_negative) for k in range(min_operands, max_operands + 1))
    if n > space:
        raise ValueError(f"n: asked for {n} problems but only {space} distinct ones exist")
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n:  # rejection of repeats only; a near-full space is slow, never wrong
        operands, ops = _draw(rng, rng.randint(min_operands, max_operands), max_operand, allow_negative)
        problem = "What is $" + " ".join(f"{op} {v}" for op, v in zip(["", *ops], operands)).strip() + "$?"
        if problem in seen:
            continue
        seen.add(problem)
        solution, answer = worked_solution(operands, ops)
        rows.append(
            {
                "prompt_id": "reason-" + hashlib.sha1(problem.encode()).hexdigest()[:12],
                "source": "reasoning",
                "split": "train",
                "subject": "Arithmetic",
                "level": len(ops),
                "problem": problem,
                "solution": solution,
                "answer": str(answer),
            }
        )
    return pd.DataFrame(rows)
