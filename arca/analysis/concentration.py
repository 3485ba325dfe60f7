"""From per-token dumps to per-trajectory concentration diagnostics for every signal (SPEC section 5), to
signal agreement (do two signals rank the same tokens of a trajectory highest?) and to the precision noise of
a low-precision run's saliences against their float32 recomputation (SPEC 2b)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from arca.analysis.agnostic import agnostic_tokens
from arca.credit.config import CreditConfig
from arca.credit.diagnostics import trajectory_diagnostics
from arca.credit.normalize import degenerate_rows, normalize

TRAJ_KEYS = ["run", "method", "rank", "seed", "step", "prompt_id", "sample"]
CHECKPOINT_KEYS = ["run", "method", "rank", "seed", "step", "phase"]
# noise.parquet: one row per signal x run x checkpoint; `32` marks the float32 recomputation.
NOISE_COLUMNS = {
    **dict.fromkeys(["run", "method"], "str"),
    **dict.fromkeys(["rank", "seed", "step"], "int32"),  # as in the dumps
    "phase": "str",
    "signal": "str",
    **dict.fromkeys(["trajectories", "tokens"], "int64"),
    **dict.fromkeys(["a_mean", "a32_mean", "noise_share", "rank_corr"], "float64"),
    "noise_dominated": "bool",
    **dict.fromkeys(["gini", "gini32", "etr", "etr32", "fallback_rate", "fallback_rate32"], "float64"),
}


def dump_signals(columns: Sequence[str]) -> list[str]:
    """Signals with a `w_<s>` column, in column (SPEC) order."""
    return [c.removeprefix("w_") for c in columns if c.startswith("w_")]


def float32_signals(columns: Sequence[str]) -> list[str]:
    """Signals with an `a32_<s>` float32 recomputation (dumps of low-precision runs only, SPEC 2b)."""
    return [c.removeprefix("a32_") for c in columns if c.startswith("a32_")]


def phase_of(steps: pd.Series) -> pd.Series:
    """Per run: step 0 -> init, the last saved step -> final, anything between -> mid."""
    return np.where(steps == 0, "init", np.where(steps == steps.max(), "final", "mid"))


def trajectory_table(
    dumps: pd.DataFrame,
    signals: Sequence[str],
    formatting_tokens: Sequence[str],
    *,
    eps: float = 1e-8,
    sharpening: float = 1.0,
    fallback: str = "raw_mean",
    top_frac: float = 0.05,
    etr_uniform: float = 0.95,
    etr_concentrated: float = 0.25,
) -> pd.DataFrame:
    """One row per trajectory x signal x over ("weight": normalized w, "raw": salience a).

    Columns: TRAJ_KEYS, phase, signal, over, T, gini, etr, top_k_mass, agnostic_share, regime, fallback
    (the trajectory's raw salience was degenerate, so its weights fell back to uniform: `arca.credit.normalize.
    degenerate_rows` under the dumps' `eps`, `sharpening` and `fallback` rule).
    """
    dumps = dumps.sort_values([*TRAJ_KEYS, "pos"], kind="stable").reset_index(drop=True)
    traj_id, keys = _trajectories(dumps)
    agnostic = agnostic_tokens(dumps["token"].tolist(), formatting_tokens)
    parts = []
    for signal in signals:
        flags = _fallback(traj_id, dumps[f"a_{signal}"].to_numpy(), len(keys), eps, sharpening, fallback)
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
            parts.append(pd.concat([keys, diag], axis=1).assign(signal=signal, over=over, fallback=flags))
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


def _trajectories(dumps: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """(N,) trajectory id of every token and one key row per trajectory (TRAJ_KEYS + phase), for a table
    sorted by TRAJ_KEYS then pos."""
    traj_id = dumps.groupby(TRAJ_KEYS, sort=False, observed=True).ngroup().to_numpy()
    keys = dumps.loc[np.r_[0, np.flatnonzero(np.diff(traj_id)) + 1], TRAJ_KEYS].reset_index(drop=True)
    keys["phase"] = keys.groupby("run")["step"].transform(phase_of)
    return traj_id, keys


def _padded(traj_id: np.ndarray, values: np.ndarray, n_traj: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (n_traj, T_max) view of contiguous trajectories: (padded values, 0/1 mask, (N,) position of each token)."""
    lengths = np.bincount(traj_id, minlength=n_traj)
    pos = np.arange(len(traj_id)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    padded = np.zeros((n_traj, max(int(lengths.max()), 1)))
    mask = np.zeros_like(padded)
    padded[traj_id, pos] = values
    mask[traj_id, pos] = 1
    return padded, mask, pos


def _fallback(
    traj_id: np.ndarray, raw: np.ndarray, n_traj: int, eps: float, sharpening: float, rule: str
) -> np.ndarray:
    """Degenerate-row flags via the same rule `credit.normalize` applies, on a padded (n_traj, T_max) view."""
    padded, mask, _ = _padded(traj_id, raw, n_traj)
    return degenerate_rows(padded, mask, eps, fallback=rule, sharpening=sharpening).numpy()


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


def within_spearman(traj_id: np.ndarray, x: np.ndarray, y: np.ndarray, n_traj: int) -> np.ndarray:
    """(n_traj,) Spearman correlation of `x` with `y` within each trajectory (average ranks for ties), NaN for
    a trajectory with fewer than 2 tokens or constant in either; the rule of `arca.credit.precision.rank_correlation`.

    Args:
        traj_id: (N,) trajectory id in [0, n_traj) of every token; x, y: (N,) values.
    """
    frame = pd.DataFrame({"t": traj_id, "x": x, "y": y})
    grouped = frame.groupby("t", sort=False)
    rx = grouped["x"].rank(method="average").to_numpy()  # (N,) 1-based ranks within the trajectory
    ry = grouped["y"].rank(method="average").to_numpy()
    k = np.bincount(traj_id, minlength=n_traj)  # (G,)
    size = np.maximum(k, 1)
    cx = rx - (np.bincount(traj_id, rx, n_traj) / size)[traj_id]  # centred ranks
    cy = ry - (np.bincount(traj_id, ry, n_traj) / size)[traj_id]
    xy, xx, yy = (np.bincount(traj_id, v, n_traj) for v in (cx * cy, cx * cx, cy * cy))
    denom = np.sqrt(xx * yy)
    ok = (k >= 2) & (denom > 0)  # ranks are multiples of 1/2, so a constant row centres to exactly 0
    return np.where(ok, xy / np.where(ok, denom, 1.0), np.nan)


def noise_table(dumps: pd.DataFrame, credit: Mapping[str, CreditConfig]) -> pd.DataFrame:
    """Precision noise (SPEC 2b) per signal x run x checkpoint, for every signal with `a32_<s>` columns.

    `noise_share` = ||a - a32|| / ||a32|| over the checkpoint's valid tokens (0 if both are all zero, inf if
    only a32 is), `rank_corr` = mean within-trajectory Spearman of a with a32 (`within_spearman`),
    `noise_dominated` = noise_share >= 1. `gini`/`etr`/`fallback_rate` are the trajectory means of the dumped
    weights `w_<s>`; the `32` columns the same for a32 normalized with the run's credit params
    (`credit[method]`), so the two concentrations sit side by side. Runs without a32 values are left out;
    no `a32_` column at all gives an empty table with `NOISE_COLUMNS`.
    """
    parts = []
    for signal in float32_signals(dumps.columns):
        has = dumps[f"a32_{signal}"].notna().groupby(dumps["run"]).transform("any")  # runs that recomputed it
        rows = dumps[has.to_numpy()].sort_values([*TRAJ_KEYS, "pos"], kind="stable").reset_index(drop=True)
        if len(rows):
            parts.append(_signal_noise(rows, signal, credit))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in NOISE_COLUMNS.items()})
    out = pd.concat(parts, ignore_index=True)[list(NOISE_COLUMNS)]
    return out.sort_values(["run", "step", "signal"], kind="stable", ignore_index=True).astype(NOISE_COLUMNS)


def _signal_noise(rows: pd.DataFrame, signal: str, credit: Mapping[str, CreditConfig]) -> pd.DataFrame:
    """`noise_table` for one signal over rows sorted by TRAJ_KEYS then pos."""
    traj_id, keys = _trajectories(rows)
    n_traj = len(keys)
    ckpt_of_traj = keys.groupby(["run", "step"], sort=True).ngroup().to_numpy()  # (G,)
    ckpt = ckpt_of_traj[traj_id]  # (N,) checkpoint of every token
    n_ckpt = int(ckpt_of_traj.max()) + 1
    a = rows[f"a_{signal}"].to_numpy(np.float64)  # (N,)
    a32 = rows[f"a32_{signal}"].to_numpy(np.float64)
    # np.bincount propagates NaN (a pandas sum would skip it), as the torch reference does.
    diff = np.sqrt(np.bincount(ckpt, (a - a32) ** 2, n_ckpt))
    ref = np.sqrt(np.bincount(ckpt, a32**2, n_ckpt))
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(ref > 0, diff / ref, np.where(diff == 0, 0.0, np.inf))
    share = np.where(np.isnan(diff) | np.isnan(ref), np.nan, share)
    w = np.nan_to_num(rows[f"w_{signal}"].to_numpy(np.float64), nan=0.0, posinf=0.0)
    w32, fallback, fallback32 = _normalized_pair(traj_id, a, a32, keys["method"].to_numpy(), credit)
    per_traj = {
        "rank_corr": within_spearman(traj_id, a, a32, n_traj),
        "fallback_rate": fallback.astype(np.float64),
        "fallback_rate32": fallback32.astype(np.float64),
    }
    for suffix, weights in (("", w), ("32", w32)):
        diag = trajectory_diagnostics(traj_id, weights)  # sorted by traj = 0 .. n_traj - 1
        per_traj[f"gini{suffix}"], per_traj[f"etr{suffix}"] = diag["gini"].to_numpy(), diag["etr"].to_numpy()
    first = np.unique(ckpt_of_traj, return_index=True)[1]  # first trajectory of every checkpoint
    out = keys.loc[first, CHECKPOINT_KEYS].reset_index(drop=True).assign(signal=signal)
    out["trajectories"] = np.bincount(ckpt_of_traj, minlength=n_ckpt)
    out["tokens"] = np.bincount(ckpt, minlength=n_ckpt)
    out["a_mean"] = np.bincount(ckpt, a, n_ckpt) / out["tokens"]
    out["a32_mean"] = np.bincount(ckpt, a32, n_ckpt) / out["tokens"]
    out["noise_share"] = share
    out["noise_dominated"] = share >= 1.0
    for name, values in per_traj.items():
        out[name] = _nanmean_by(ckpt_of_traj, values, n_ckpt)
    return out


def _normalized_pair(
    traj_id: np.ndarray, a: np.ndarray, a32: np.ndarray, method: np.ndarray, credit: Mapping[str, CreditConfig]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """((N,) a32 normalized with each trajectory's run credit params, (G,) fallback flags of a, of a32)."""
    n_traj = len(method)
    raw, mask, pos = _padded(traj_id, a, n_traj)
    raw32, _, _ = _padded(traj_id, a32, n_traj)
    w32 = np.zeros((n_traj, raw.shape[1]), dtype=np.float32)
    fallback, fallback32 = np.zeros(n_traj, dtype=bool), np.zeros(n_traj, dtype=bool)
    for name in np.unique(method):  # one pass per training method (a handful), never per trajectory
        if name not in credit:
            raise KeyError(f"credit: no CreditConfig for method {name!r} (have {sorted(credit)})")
        c, sel = credit[name], method == name
        flags = degenerate_rows(raw[sel], mask[sel], c.eps, fallback=c.fallback, sharpening=c.sharpening)
        fallback[sel] = flags.numpy()
        w, fb = normalize(raw32[sel], mask[sel], **c.normalization())
        w32[sel], fallback32[sel] = w.numpy(), fb.numpy()
    return w32[traj_id, pos].astype(np.float64), fallback, fallback32


def _nanmean_by(group: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups,) mean of the finite `values` of each group, NaN where a group has none."""
    ok = np.isfinite(values)
    count = np.bincount(group[ok], minlength=n_groups)
    total = np.bincount(group[ok], values[ok], n_groups)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
