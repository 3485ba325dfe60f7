"""Prompts for one problem: chat messages (optional system turn and few-shot pairs) or the paper's raw text."""

from __future__ import annotations

from collections.abc import Sequence

from arca.tasks.boxed import extract_boxed

# Qwen's standard math instruction, for callers of build_prompt that want one.
DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# The ARCA paper's raw-text prompt (its `data.py`, MATH task); `{problem}` is replaced by the problem text.
PAPER_TEMPLATE = "Solve this math problem step by step. Put your final answer in \\boxed{}.\n\nProblem: {problem}\n"
PROBLEM_FIELD = "{problem}"


def build_prompt(problem: str, few_shot: Sequence[tuple[str, str]] = (), system: str | None = None) -> list[dict]:
    """Chat messages for one problem: optional system turn, few-shot user/assistant pairs, the problem.

    Args:
        problem: the problem text (final user turn).
        few_shot: (problem, worked answer) pairs; each answer must end its reasoning in a `\\boxed{}`.
        system: system message, e.g. `DEFAULT_SYSTEM`; omitted when None.

    Returns:
        Messages `[{"role": ..., "content": ...}, ...]` ready for `apply_chat_template`.
    """
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("problem: must be a non-empty string")
    messages = [] if system is None else [{"role": "system", "content": system}]
    for index, (shot_problem, shot_answer) in enumerate(few_shot):
        if extract_boxed(shot_answer) is None:
            raise ValueError(f"few_shot[{index}]: the answer has no complete \\boxed{{...}}; end it with one")
        messages.append({"role": "user", "content": shot_problem})
        messages.append({"role": "assistant", "content": shot_answer})
    messages.append({"role": "user", "content": problem})
    return messages


def raw_prompt(problem: str, template: str) -> str:
    """A plain-text prompt (no chat template): `template` with `{problem}` replaced by the problem text.

    Only the literal `{problem}` is replaced (no `str.format`), so templates may hold LaTeX braces such as
    `\\boxed{}`, as the paper's `PAPER_TEMPLATE` does.

    Args:
        problem: the problem text.
        template: the prompt text around the problem; must contain `{problem}`.
    """
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("problem: must be a non-empty string")
    if not isinstance(template, str) or PROBLEM_FIELD not in template:
        raise ValueError(f"template: must be a string containing {PROBLEM_FIELD}, got {template!r}")
    return template.replace(PROBLEM_FIELD, problem)
