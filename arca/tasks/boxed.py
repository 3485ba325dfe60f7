"""The last `\\boxed{...}` of a text (SPEC 7): the answer a grader reads and a few-shot pair must end with. Plain
string scanning, no sympy, so the params schema checks few-shot answers without loading a grader.

Imports: the standard library only.
"""

from __future__ import annotations

import re

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, with balanced braces.

    Runs in linear time with no recursion (hostile inputs may nest braces thousands deep). Escaped braces
    `\\{` and `\\}` are literal characters and do not open or close a group.

    Args:
        text: a completion or a MATH solution.

    Returns:
        The content between the braces (possibly empty), or None when there is no box or the last box is
        unterminated.
    """
    last = None
    for match in _BOX_OPEN.finditer(text):
        last = match
    if last is None:
        return None
    start = last.end()
    depth = 1
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (`\{`, `\}`, `\\`)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None
