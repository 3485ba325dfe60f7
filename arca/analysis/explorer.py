"""The token explorer: one self-contained HTML page over every run x checkpoint x completion of a token dump.

A reader picks a run, a checkpoint and a completion, sees the problem and its reference answer, the completion
with its reward and advantage, each token colored by a signal's normalized weight (switch signal, or compare two
side by side), the raw salience `a` and weight `w` on hover, the decisive tokens of SPEC 9 boxed and the
completion's Gini / ETR per signal (SPEC 5, `arca.credit.diagnostics`). Data, script and style are inline (no
network, no server); floats are rounded to `DIGITS` significant digits to keep the page small. Written by the
figures stage (results/figures/explorer.html) and by `arca inspect`.

No matplotlib, no pyarrow: `arca inspect` runs on the base install. The page itself is explorer_page.html beside
this module (package data).
"""

from __future__ import annotations

import html
import json
import math
import unicodedata
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from arca.credit.diagnostics import trajectory_diagnostics
from arca.io import atomic_path
from arca.methods import SIGNAL_NAMES

DIGITS = 3  # significant digits of every float on the page: colors need ~2, the tooltip reads 3
KEYS = ["run", "step", "prompt_id", "sample"]  # one completion (a run's method is a function of the run id)
REQUIRED = [*KEYS, "pos", "token", "w_"]  # "w_": at least one signal's weights
_VISIBLE = {"\n": "\u23ce", "\t": "\u21e5", " ": "\u00b7", "\r": "\\r"}
_TEMPLATE = "explorer_page.html"
_PREFERRED_SIGNAL = "arca"  # the first view colors by ARCA when the dump has it


def visible_token(text: str) -> str:
    """Token text with newline, tab, space, carriage return and other control characters made visible.

    The empty token is shown as `∅`.
    """
    if text == "":
        return "\u2205"
    return "".join(_VISIBLE.get(ch) or (f"\\x{ord(ch):02x}" if unicodedata.category(ch) == "Cc" else ch) for ch in text)


def rounded(values) -> list[float | None]:
    """`values` rounded to DIGITS significant digits, NaN and infinities as None (JSON has no NaN)."""
    out = []
    for x in np.asarray(values, dtype=np.float64).tolist():
        out.append(float(f"{x:.{DIGITS}g}") if math.isfinite(x) else None)
    return out


def compact(values) -> list[float | None] | float | None:
    """`rounded(values)`, or its one value when every value rounds the same (uniform weights, a fallback row):
    the page reads a number where a list would repeat it."""
    out = rounded(values)
    return out[0] if out and out.count(out[0]) == len(out) else out


def _signals(columns) -> list[str]:
    """Signals with a `w_<s>` column, SPEC 2 order first, then any others sorted."""
    found = {c[2:] for c in columns if c.startswith("w_")}
    return [s for s in SIGNAL_NAMES if s in found] + sorted(found - set(SIGNAL_NAMES))


def _check(tokens: pd.DataFrame, effects: pd.DataFrame | None, problems: pd.DataFrame | None) -> list[str]:
    missing = [c for c in REQUIRED[:-1] if c not in tokens.columns]
    signals = _signals(tokens.columns)
    if missing or not signals:
        need = missing + ([] if signals else ["w_<signal>"])
        raise ValueError(f"tokens: missing columns {need} (the SPEC 6 dump schema); have {list(tokens.columns)}")
    if effects is not None and (gone := {*KEYS, "pos", "decisive"} - set(effects.columns)):
        raise ValueError(f"effects: missing columns {sorted(gone)} (the faithfulness stage's effects.parquet)")
    if problems is not None and (gone := {"prompt_id", "problem"} - set(problems.columns)):
        raise ValueError(f"problems: missing columns {sorted(gone)}; need prompt_id, problem and optionally answer")
    return signals


def _concentration(tokens: pd.DataFrame, signals: list[str]) -> dict[str, pd.DataFrame]:
    """Per signal, one row per completion (in `tokens`' completion order): gini, etr over the weights."""
    traj = tokens.groupby(KEYS, sort=False, observed=True).ngroup().to_numpy()  # (N,) contiguous ids
    out = {}
    for s in signals:
        w = np.nan_to_num(tokens[f"w_{s}"].to_numpy(np.float64), nan=0.0, posinf=0.0)
        out[s] = trajectory_diagnostics(traj, np.clip(w, 0.0, None))[["gini", "etr"]]
    return out


def _marks(effects: pd.DataFrame | None) -> dict[tuple, tuple[set, set]]:
    """(run, step, prompt_id, sample) -> (decisive positions, scored positions)."""
    if effects is None or effects.empty:
        return {}
    out: dict[tuple, tuple[set, set]] = {}
    for _, rows in effects.groupby(KEYS, sort=False, observed=True):
        pos = rows["pos"].astype(int)
        out[_key(rows.iloc[0])] = (set(pos[rows["decisive"].astype(bool)].tolist()), set(pos.tolist()))
    return out


def _key(row: pd.Series) -> tuple:
    return (str(row["run"]), int(row["step"]), str(row["prompt_id"]), int(row["sample"]))


def _value(rows: pd.DataFrame, column: str) -> float | None:
    return rounded([rows[column].iat[0]])[0] if column in rows else None


def _completion(rows: pd.DataFrame, signals: list[str], stats: dict, index: int, marks: dict) -> dict:
    """One completion's record: its keys, tokens, every signal's a and w, Gini / ETR, decisive marks."""
    first = rows.iloc[0]
    key = _key(first)
    decisive, scored = marks.get(key, (set(), set()))
    positions = rows["pos"].astype(int).tolist()
    at = {p: i for i, p in enumerate(positions)}
    return {
        "run": key[0],
        "method": str(first["method"]) if "method" in rows else "",
        "step": key[1],
        "prompt_id": key[2],
        "sample": key[3],
        "reward": _value(rows, "reward"),
        "advantage": _value(rows, "advantage"),
        "pos": positions,
        "ids": rows["token_id"].astype(int).tolist() if "token_id" in rows else [None] * len(rows),
        "tok": [visible_token(t) for t in rows["token"].astype(str)],
        "w": [compact(rows[f"w_{s}"]) for s in signals],  # per signal: a list over tok, or one number for all
        "a": [compact(rows[f"a_{s}"]) if f"a_{s}" in rows else None for s in signals],
        "gini": [rounded([stats[s]["gini"].iat[index]])[0] for s in signals],
        "etr": [rounded([stats[s]["etr"].iat[index]])[0] for s in signals],
        "dec": sorted(at[p] for p in decisive if p in at),  # indices into tok
        "scored": sorted(at[p] for p in scored if p in at),
    }


def _problems(problems: pd.DataFrame | None, prompt_ids: set[str]) -> dict[str, dict]:
    if problems is None:
        return {}
    out = {}
    for row in problems.itertuples(index=False):
        if str(row.prompt_id) in prompt_ids:
            answer = getattr(row, "answer", None)
            answer = None if answer is None or (isinstance(answer, float) and math.isnan(answer)) else str(answer)
            out[str(row.prompt_id)] = {"problem": str(row.problem), "answer": answer}
    return out


def explorer_data(
    tokens: pd.DataFrame, *, effects: pd.DataFrame | None = None, problems: pd.DataFrame | None = None
) -> dict:
    """The page's data: signals, problems and one record per completion (sorted by run, step, prompt, sample)."""
    signals = _check(tokens, effects, problems)
    tokens = tokens.sort_values([*KEYS, "pos"], kind="stable").reset_index(drop=True)
    stats = _concentration(tokens, signals)
    marks = _marks(effects)
    groups = tokens.groupby(KEYS, sort=False, observed=True)
    completions = [_completion(rows, signals, stats, i, marks) for i, (_, rows) in enumerate(groups)]
    return {
        "signals": signals,
        "initial_signal": _PREFERRED_SIGNAL if _PREFERRED_SIGNAL in signals else signals[0],
        "problems": _problems(problems, {c["prompt_id"] for c in completions}),
        "completions": completions,
    }


def explorer_html(
    tokens: pd.DataFrame,
    *,
    effects: pd.DataFrame | None = None,
    problems: pd.DataFrame | None = None,
    title: str = "ARCA token explorer",
) -> str:
    """The whole explorer page as one HTML string.

    Args:
        tokens: SPEC 6 token rows (one dump or several concatenated: runs, checkpoints): at least `run, step,
            prompt_id, sample, pos, token` and `w_<signal>` columns; `method, token_id, reward, advantage,
            a_<signal>` shown where present.
        effects: SPEC 9 per-position effects (`run, step, prompt_id, sample, pos, decisive`, the faithfulness
            stage's effects.parquet), or None: decisive tokens boxed, scored ones dotted.
        problems: `prompt_id, problem` and optionally `answer`, or None (no problem text shown).
        title: page title and heading.

    Returns:
        the page: inline JSON, script and style, no external resource.
    """
    data = explorer_data(tokens, effects=effects, problems=problems)
    # "<" escaped inside JSON strings, so no token text can close the <script> element it sits in.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    template = resources.files("arca.analysis").joinpath(_TEMPLATE).read_text(encoding="utf-8")
    head, marker, tail = template.partition("__DATA__")  # the one data slot; the title goes in the head only
    assert marker, f"{_TEMPLATE}: no __DATA__ slot"
    return head.replace("__TITLE__", html.escape(title)) + payload + tail


def write_explorer(path: Path | str, tokens: pd.DataFrame, **kwargs) -> Path:
    """Write `explorer_html(tokens, **kwargs)` to `path` atomically; returns the path."""
    text = explorer_html(tokens, **kwargs)
    with atomic_path(path, ".html") as tmp:
        tmp.write_text(text, encoding="utf-8")  # tokens are any script: never the locale's encoding
    return Path(path)
