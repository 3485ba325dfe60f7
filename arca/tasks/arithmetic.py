"""A seeded, verifiable source of one-digit arithmetic problems: the easy training signal the embedded
135M model needs to see mixed-reward GRPO groups (it scores ~0 on MATH and on the wheel's word problems)."""

from __future__ import annotations

import hashlib
import random

import pandas as pd

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "\\times": lambda a, b: a * b}


def arithmetic_problems(
    n: int, seed: int = 0, max_operand: int = 9, operators: tuple[str, ...] = ("+",)
) -> pd.DataFrame:
    """`n` distinct problems "What is $a + b$?" with integer answers, in the normalized problem-table layout.

    Args:
        n: number of problems (at most the number of distinct operand/operator triples).
        seed: the only source of randomness; the same seed gives the same table.
        max_operand: operands are drawn from 0..max_operand.
        operators: any of "+", "-", "\\times".
    """
    unknown = [op for op in operators if op not in OPERATORS]
    if unknown:
        raise ValueError(f"operators: unknown {unknown}; choose from {sorted(OPERATORS)}")
    space = [(a, op, b) for op in operators for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if n > len(space):
        raise ValueError(f"n: asked for {n} problems but only {len(space)} distinct ones exist")
    picked = random.Random(seed).sample(space, n)
    rows = []
    for a, op, b in picked:
        problem = f"What is ${a} {op} {b}$?"
        answer = str(OPERATORS[op](a, b))
        rows.append(
            {
                "prompt_id": "arith-" + hashlib.sha1(problem.encode()).hexdigest()[:12],
                "source": "arithmetic",
                "split": "train",
                "subject": "Arithmetic",
                "level": 0,
                "problem": problem,
                "solution": f"${a} {op} {b} = \\boxed{{{answer}}}$.",
                "answer": answer,
            }
        )
    return pd.DataFrame(rows)
