"""From per-token dumps to per-trajectory concentration diagnostics for every signal (SPEC section 5) and
to signal agreement: do two signals rank the same tokens of a trajectory highest?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from arca.agnostic import agnostic_tokens
from arca.credit import degenerate_rows
from arca.diagnostics import trajectory_diagnostics

TRAJ_KEYS = ["run", "method", "rank", "seed", "step", "prompt_id", "sample"]


def phase_of(steps: pd.Series) -> pd.Series:
    """Per run: step 0 -> init, the last saved step -> final, anything between -> mid."""
    return np.where(steps == 0, "init", np.where(steps == steps.max(), "final", "mid"))


def trajectory_table(
    dumps: pd.DataFrame,
    signals: Sequence[str],
    formatting_tokens: Sequence[str],
    *,
    eps: float = 1e-8,
    top_frac: float = 0.05,
    etr_uniform: float = 0.95,
    etr_concentrated: float = 0.25,
) -> pd.DataFrame:
    """One row per trajectory x signal x over ("weight": normalized w, "raw": salience a).

    Columns: TRAJ_KEYS, phase, signal, over, T, gini, etr, top_k_mass, agnostic_share, regime, fallback
    (the trajectory's raw salience was degenerate, so its weights fell back to uniform).
    """
    dumps = dumps.sort_values([*TRAJ_KEYS, "pos"], kind="stable").reset_index(drop=True)
    traj_id = dumps.groupby(TRAJ_KEYS, sort=False, observed=True).ngroup().to_numpy()
    keys = dumps.loc[np.r_[0, np.flatnonzero(np.diff(traj_id)) + 1], TRAJ_KEYS].reset_index(drop=True)
    keys["phase"] = keys.groupby("run")["step"].transform(phase_of)
    agnostic = agnostic_tokens(dumps["token"].tolist(), formatting_tokens)
    parts = []
    for signal in signals:
        fallback = _fallback(traj_id, dumps[f"a_{signal}"].to_numpy(), len(keys), eps)
        for over, column in (("weight", f"w_{signal}"), ("raw", f"a_{signal}")):
            values = np.nan_to_num(dumps[column].to_numpy(np.float64), nan=0.0, posinf=0.0)
            diag = trajectory_diagnostics(
                traj_id,
                values,
                agnostic,
                top_frac=top_frac,
                etr_uniform=etr_uniform,
                etr_concentrated=etr_concentrated,
            ).drop(columns="traj")
            parts.append(pd.concat([keys, diag], axis=1).assign(signal=signal, over=over, fallback=fallback))
    cols = [
        *TRAJ_KEYS,
        "phase",
        "signal",
        "over",
        "T",
        "gini",
        "etr",
        "top_k_mass",
        "agnostic_share",
        "regime",
        "fallback",
    ]
    return pd.concat(parts, ignore_index=True)[cols]


def _fallback(traj_id: np.ndarray, raw: np.ndarray, n_traj: int, eps: float) -> np.ndarray:
    """Degenerate-row flags via the same rule `credit.normalize` applies, on a padded (n_traj, T_max) view."""
    lengths = np.bincount(traj_id, minlength=n_traj)
    pos = np.arange(len(traj_id)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    padded = np.zeros((n_traj, max(int(lengths.max()), 1)))
    mask = np.zeros_like(padded)
    padded[traj_id, pos] = raw
    mask[traj_id, pos] = 1
    return degenerate_rows(padded, mask, eps).numpy()


def signal_agreement(dumps: pd.DataFrame, signals: Sequence[str]) -> pd.DataFrame:
    """Mean Spearman rank correlation of normalized weights between every pair of signals, per run x step
    (over trajectories with >= 3 tokens; constant trajectories, e.g. uniform fallbacks, are skipped)."""
    pairs = [(a, b) for i, a in enumerate(signals) for b in signals[i + 1 :] if "uniform" not in (a, b)]
    ranks = dumps[TRAJ_KEYS].copy()
    grouped = dumps.groupby(TRAJ_KEYS, sort=False, observed=True)
    for s in signals:
        ranks[s] = grouped[f"w_{s}"].rank(method="average")
    rows = []
    for (run, step), frame in ranks.groupby(["run", "step"], sort=True):
        g = frame.groupby(TRAJ_KEYS, sort=False, observed=True)
        for a, b in pairs:
            rho = _per_group_pearson(frame, g, a, b)
            rows.append(
                {
                    "run": run,
                    "step": int(step),
                    "signal_a": a,
                    "signal_b": b,
                    "spearman_mean": float(np.nanmean(rho)) if np.isfinite(rho).any() else np.nan,
                    "n": int(np.isfinite(rho).sum()),
                }
            )
    return pd.DataFrame(rows)


def _per_group_pearson(frame: pd.DataFrame, g, a: str, b: str) -> np.ndarray:
    """Pearson correlation of two rank columns within each trajectory (= Spearman on the raw values)."""
    x = frame[a] - g[a].transform("mean")
    y = frame[b] - g[b].transform("mean")
    sums = (
        pd.DataFrame({"xy": x * y, "xx": x * x, "yy": y * y, "k": g[a].transform("size")})
        .groupby(g.ngroup().to_numpy())
        .agg({"xy": "sum", "xx": "sum", "yy": "sum", "k": "first"})
    )
    denom = np.sqrt(sums["xx"] * sums["yy"]).to_numpy()
    ok = (denom > 1e-12) & (sums["k"].to_numpy() >= 3)
    return np.where(ok, sums["xy"].to_numpy() / np.where(ok, denom, 1.0), np.nan)
