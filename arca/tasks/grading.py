"""Binary correctness rewards for MATH-style completions (SPEC section 7): the last `\\boxed{}` answer, compared
with the reference answer by math-verify (`math_verify`, the default) or by the ARCA paper's normalized string
equality (`exact`). `GRADERS` and `REWARD_FUNCS` look both up by name (the params key `train.grader`).

Only the boxed content is ever handed to math-verify: left to its defaults it pulls any number out of free
text, so a completion that never commits to a boxed answer would still be credited.

Decisions (tested in tests/tasks/test_grading.py):
- The answer is the content of the *last* `\\boxed{...}` / `\\fbox{...}` (also `\\boxed {`); if that last
  box is unterminated (e.g. a truncated generation) there is no answer, even if an earlier box closed.
- `x=3` against reference `3` is correct (math-verify's assignment rule: the right-hand side of a
  `symbol = value` prediction is compared); `3` against reference `x=3` is also correct.
- Boxed content longer than `MAX_ANSWER_CHARS` gets 0.0 without calling sympy, and so does an answer
  whose parsed expression holds a number beyond `MAX_DIGITS` digits (`9^{9^{9^9}}`, `(10^9)!`), a
  sum/product over more than `MAX_TERMS` terms, or a power of a sum expanding to more than
  `MAX_EXPANDED_TERMS` monomials (`(a+b+c+d+e+f)^{12}`): sympy would work on those for minutes to hours,
  partly inside single C calls that no timer interrupts. These caps (not a timer) are what bound the
  grading time off the main thread, where math-verify's `signal.alarm` timeouts cannot be used and are
  switched off; they are heuristics, so a crafted answer under them may still take seconds.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Sequence

import sympy
from math_verify import LatexExtractionConfig, parse, verify
from sympy.core.function import Application

from arca.tasks.boxed import extract_boxed

logger = logging.getLogger(__name__)

# Longest boxed answer (either side) handed to sympy; MATH answers are at most a few hundred characters
# (the longest MATH-500 answer has ~90), and sympy time grows fast with expression size.
MAX_ANSWER_CHARS = 1_000
# math-verify's own per-call timeouts (seconds), used only in the main thread where signal.alarm works.
MAIN_THREAD_TIMEOUT_S = 5
# Largest magnitude (decimal digits, either way from 1) of a numeric power or function value in an answer;
# MATH answers stay under a few hundred digits, and sympy handles 10,000-digit integers in milliseconds.
MAX_DIGITS = 10_000
# Most terms of a numeric-bounded sum or product (sympy may expand it term by term).
MAX_TERMS = 10_000
# Most monomials in the expansion of a power of a sum, `C(n + k - 1, k - 1)` for `(k terms)^n` (a heuristic
# bound): sympy expands `(x+y+z)^20` (231 monomials) in about a second and `(a+b+c+d+e+f)^12` for minutes.
MAX_EXPANDED_TERMS = 300
_HUGE = sympy.Float(f"1e{MAX_DIGITS}")
_TINY = sympy.Float(f"1e-{MAX_DIGITS}")

# The boxed match has the highest priority and plain `$...$` is never searched: we hand over a single box.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),)


def _parse_boxed(answer: str, timeout_s: int | None) -> list:
    """math-verify parse of one answer, wrapped in a box so that only that box is read."""
    return parse(
        "\\boxed{" + answer + "}",
        extraction_config=_EXTRACTION,
        parsing_timeout=timeout_s,
    )


def _node_too_large(node: sympy.Basic) -> bool:
    """Whether one expression node would make sympy build a number beyond the caps."""
    if isinstance(node, (sympy.Sum, sympy.Product)):
        for _, lower, upper in node.limits:
            span = upper - lower
            if span.is_number and span.is_finite and abs(span) > MAX_TERMS:
                return True
        return False
    if isinstance(node, sympy.Pow) and isinstance(node.base, sympy.Add) and node.exp.is_Integer:
        n_terms, power = len(node.base.args), abs(int(node.exp))
        if power > MAX_EXPANDED_TERMS or math.comb(power + n_terms - 1, n_terms - 1) > MAX_EXPANDED_TERMS:
            return True
    if isinstance(node, (sympy.Pow, Application)) and node.is_number:
        magnitude = abs(node.evalf(15))  # mpmath floats: 9**(9**9) evaluates in microseconds
        if magnitude.is_Float:
            return bool(magnitude > _HUGE or (magnitude != 0 and magnitude < _TINY))
    return False


def _too_large(parsed: list) -> bool:
    """Whether any sympy object in a math-verify parse result breaks the size caps.

    Nodes are checked children first (reversed pre-order, iterative): evaluating `9**(9**(9**9))` before
    its exponent would itself compute a 369-million-digit integer.
    """
    stack = [item for item in parsed if isinstance(item, (sympy.Basic, sympy.MatrixBase))]
    preorder = []
    while stack:
        node = stack.pop()
        if isinstance(node, sympy.MatrixBase):
            stack.extend(node)
            continue
        preorder.append(node)
        stack.extend(node.args)
    return any(_node_too_large(node) for node in reversed(preorder))


def boxed_answers(completion: str, reference: str) -> tuple[str | None, str]:
    """(last boxed answer of `completion` or None, last boxed answer of `reference` or the whole reference)."""
    gold = extract_boxed(reference)
    return extract_boxed(completion), reference if gold is None else gold


def math_reward(completion: str, reference: str) -> float:
    """1.0 if the last boxed answer of `completion` is equivalent to `reference`, else 0.0.

    Safe in worker threads: off the main thread math-verify's signal-based timeouts are disabled and
    `MAX_ANSWER_CHARS` bounds the work. Any error inside math-verify counts as wrong (0.0), logged at
    debug level. Deterministic.

    Args:
        completion: generated text; it must contain a complete `\\boxed{...}` to earn credit.
        reference: a MATH solution containing `\\boxed{}` (its last box is the answer) or a bare answer.

    Returns:
        1.0 or 0.0.
    """
    predicted, gold = boxed_answers(completion, reference)
    if predicted is None or not predicted.strip():
        return 0.0
    if not gold.strip():
        return 0.0
    if len(predicted) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        logger.debug("math_reward: answer over MAX_ANSWER_CHARS=%d, graded 0.0", MAX_ANSWER_CHARS)
        return 0.0
    timeout_s = MAIN_THREAD_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = _parse_boxed(gold, timeout_s)
        predicted_parsed = _parse_boxed(predicted, timeout_s)
        if not gold_parsed or not predicted_parsed:
            return 0.0
        if _too_large(predicted_parsed) or _too_large(gold_parsed):
            logger.debug("math_reward: %r exceeds MAX_DIGITS/MAX_TERMS, graded 0.0", predicted[:80])
            return 0.0
        correct = verify(gold_parsed, predicted_parsed, timeout_seconds=timeout_s)
    except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        logger.debug("math_reward: math-verify failed on %r vs %r: %r", predicted[:80], gold[:80], exc)
        return 0.0
    return 1.0 if correct else 0.0


# ---- exact: the paper's grader ---------------------------------------------------------------------------

# Removed from a boxed answer before `exact` compares, in this order (after whitespace and trailing periods).
_EXACT_DROPPED = ("\\left", "\\right", "\\,", "\\;", "\\!", "\\text")
_EXACT_FRACS = ("\\dfrac", "\\tfrac")


def normalize_exact(answer: str) -> str:
    """The ARCA paper's light normalization of a boxed answer (SPEC 7 `exact`), step for step in its order.

    Strip; collapse whitespace runs to one space; drop trailing periods (all of them, as the paper's
    `rstrip(".")`; SPEC 7 says "one"); remove `\\left`, `\\right`, `\\,`, `\\;`, `\\!` and `\\text` (the
    command only: `\\text{ cm}` -> `{ cm}`); map `\\dfrac` and `\\tfrac` to `\\frac`; strip again. Nothing else:
    no lowercasing (the paper's docstring says so, its code does not), no unit or `^\\circ` removal.
    """
    text = re.sub(r"\s+", " ", answer.strip()).rstrip(".")
    for command in _EXACT_DROPPED:
        text = text.replace(command, "")
    for command in _EXACT_FRACS:
        text = text.replace(command, "\\frac")
    return text.strip()


def exact_reward(completion: str, reference: str) -> float:
    """1.0 if the normalized last boxed answer of `completion` equals the normalized reference, else 0.0.

    The paper's reward (its `math_task.math_reward`): string equality after `normalize_exact`, no math-verify,
    so `\\boxed{0.5}` against `\\frac{1}{2}` is wrong. The answer is found by `extract_boxed` (SPEC 7); on the
    12,500 MATH reference solutions it gives exactly the paper's extraction (which only knows `\\boxed{`, not
    `\\fbox{` or `\\boxed {`, and counts escaped braces as braces), so they can differ only on such completions.
    Arguments as `math_reward`; returns 1.0 or 0.0.
    """
    predicted, gold = boxed_answers(completion, reference)
    if predicted is None:
        return 0.0
    gold = normalize_exact(gold)
    return 1.0 if gold and normalize_exact(predicted) == gold else 0.0


# name -> grader(completion, reference) -> 0.0 / 1.0; `train.grader` picks the training reward by this name.
GRADERS: dict[str, Callable[[str, str], float]] = {"math_verify": math_reward, "exact": exact_reward}


def _completion_text(completion: str | Sequence[dict]) -> str:
    """The text of one TRL completion: a string, or (conversational) the last message's content."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content", "")
    if isinstance(content, list):  # multimodal-style content blocks
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _grade_batch(grade: Callable[[str, str], float], completions: list, answer: list[str]) -> list[float]:
    if len(completions) != len(answer):
        raise ValueError(
            f"answer: got {len(answer)} references for {len(completions)} completions; "
            "the dataset column `answer` must hold one reference per prompt"
        )
    return [grade(_completion_text(c), a) for c, a in zip(completions, answer)]


def accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: `math_reward` of each completion against the dataset column `answer`.

    Args:
        completions: B strings, or B conversations (lists of `{"role", "content"}` messages).
        answer: B reference final answers (already extracted from the MATH solutions).
        **kwargs: the other arguments TRL passes (prompts, completion_ids, dataset columns); unused.

    Returns:
        B rewards in {0.0, 1.0}.
    """
    return _grade_batch(math_reward, completions, answer)


def exact_accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: `exact_reward` (the paper's grader) of each completion against `answer`.

    Args and returns as `accuracy_reward`.
    """
    return _grade_batch(exact_reward, completions, answer)


accuracy_reward.__name__ = "accuracy"
exact_accuracy_reward.__name__ = "accuracy_exact"

# name -> TRL reward function, open-r1 style (`train.grader`).
REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {"math_verify": accuracy_reward, "exact": exact_accuracy_reward}


def reward_function(name: str) -> Callable[..., list[float]]:
    """The TRL reward function of grader `name`; the error names `train.grader` and the choices."""
    if name not in REWARD_FUNCS:
        raise ValueError(f"params.yaml: train.grader must be one of {', '.join(REWARD_FUNCS)}, got {name!r}")
    return REWARD_FUNCS[name]
