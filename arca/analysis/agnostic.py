"""Which decoded tokens are task-agnostic (SPEC section 5): only whitespace or punctuation, or a formatting
token from the params list; the agnostic-share diagnostic weighs credit on them."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np
import pandas as pd


def _is_agnostic_text(text: str, formatting: frozenset[str]) -> bool:
    # Unicode punctuation (P*) only: math symbols such as + = < > are content, `$` belongs in the list.
    if all(ch.isspace() or unicodedata.category(ch).startswith("P") for ch in text):
        return True
    return text.strip().casefold() in formatting


def agnostic_tokens(tokens: Sequence[str], formatting_tokens: Sequence[str]) -> np.ndarray:
    """Flag task-agnostic tokens by decoded text: only whitespace/punctuation, or in the formatting list.

    List entries and tokens are compared stripped and case-insensitively (`" The"` matches `"the"`). Empty
    text counts as whitespace. Each distinct text is classified once, so long token columns are cheap.

    Args:
        tokens: `(N,)` decoded token texts.
        formatting_tokens: formatting tokens from params (chat markers, `\\\\`, `$`, `\\\\boxed`, "the", ...).

    Returns:
        `(N,)` bool.
    """
    formatting = frozenset(t.strip().casefold() for t in formatting_tokens)
    codes, uniques = pd.factorize(np.asarray(tokens, dtype=object))
    flags = np.fromiter((_is_agnostic_text(str(u), formatting) for u in uniques), bool, len(uniques))
    return flags[codes] if len(codes) else np.zeros(0, dtype=bool)
