"""Benchmark: vectorized `trajectory_diagnostics` against a plain pandas groupby-apply, in one run.

Run: `python -m bench.diagnostics [--quick] [--tokens 10000000] [--seed 0]`.

Builds a synthetic flat per-token table (~20k trajectories of ragged length, heavy-tailed weights with
mean 1 per trajectory, ~25% agnostic tokens), times `trajectory_diagnostics` on all of it, times two
pandas groupby-apply baselines on a subsample of whole trajectories (they are far too slow for the full
table) and extrapolates them per token, checks that they agree with ours on that subsample, and ends with
one line (ratio against the straightforward pandas baseline, "pandas"):
`diagnostics: <M> tokens/s, <ratio>x pandas`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import pandas as pd

from arca.credit.diagnostics import trajectory_diagnostics

METRICS = ["gini", "etr", "top_k_mass", "agnostic_share"]


def synthetic_table(n_tokens: int, seed: int) -> pd.DataFrame:
    """Flat token table: lognormal lengths (median ~350, 16..4096), Pareto-tailed weights, mean 1 each."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(350), 0.8, size=2 * n_tokens // 100), 16, 4096).astype(np.int64)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    lengths[-1] -= lengths.sum() - n_tokens  # exactly n_tokens
    lengths = lengths[lengths > 0]
    traj = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    raw = rng.pareto(1.3, n_tokens) * (rng.random(n_tokens) < 0.9)  # heavy tail plus exact zeros
    sums = np.add.reduceat(raw, np.concatenate(([0], np.cumsum(lengths)[:-1])))
    sums[sums == 0] = 1.0
    weights = (raw * np.repeat(lengths / sums, lengths)).astype(np.float32)  # mean 1 per trajectory
    agnostic = rng.random(n_tokens) < 0.25
    return pd.DataFrame({"traj": traj, "w": weights, "agnostic": agnostic})


def _pandas_metrics(group: pd.DataFrame) -> pd.Series:
    """The straightforward per-trajectory implementation of SPEC section 5, in pandas Series methods."""
    w = group["w"].astype("float64")
    t, total = len(w), w.sum()
    k = math.ceil(round(0.05 * t, 9))
    if total == 0:
        return pd.Series(
            {"T": t, "gini": 0.0, "etr": 1.0, "top_k_mass": k / t, "agnostic_share": group["agnostic"].mean()}
        )
    ranked = w.sort_values(ignore_index=True)
    gini = 2 * (ranked * (ranked.index + 1)).sum() / (t * total) - (t + 1) / t if t > 1 else 0.0
    etr = total**2 / (t * (w**2).sum())
    top = w.nlargest(k).sum() / total
    agn = w[group["agnostic"]].sum() / total
    return pd.Series({"T": t, "gini": gini, "etr": etr, "top_k_mass": top, "agnostic_share": agn})


def _numpy_in_apply_metrics(group: pd.DataFrame) -> pd.Series:
    """A tuned baseline: still one Python call per trajectory, but plain numpy arrays inside."""
    w = np.sort(group["w"].to_numpy(dtype=np.float64))
    t, total = len(w), w.sum()
    k = math.ceil(round(0.05 * t, 9))
    if total > 0:
        gini = 2 * np.sum(np.arange(1, t + 1) * w) / (t * total) - (t + 1) / t if t > 1 else 0.0
        etr = total**2 / (t * np.sum(w**2))
        top = w[-k:].sum() / total
        agn = group["w"].to_numpy(dtype=np.float64)[group["agnostic"].to_numpy()].sum() / total
    else:
        gini, etr, top, agn = 0.0, 1.0, k / t, group["agnostic"].mean()
    return pd.Series({"T": t, "gini": gini, "etr": etr, "top_k_mass": top, "agnostic_share": agn})


def pandas_baseline(table: pd.DataFrame, metrics=_pandas_metrics) -> pd.DataFrame:
    return table.groupby("traj").apply(metrics, include_groups=False).reset_index()


def _check_agree(ours: pd.DataFrame, base: pd.DataFrame, name: str) -> None:
    mine = ours.set_index("traj").loc[base["traj"]].reset_index()
    assert (mine["T"].to_numpy() == base["T"].to_numpy()).all(), name
    for m in METRICS:
        np.testing.assert_allclose(mine[m], base[m], rtol=1e-9, atol=1e-12, err_msg=f"{name}: {m}")


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller pandas subsample")
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    repeats, sub_traj = (5, 300) if args.quick else (10, 2000)

    table = synthetic_table(args.tokens, args.seed)
    traj, w, agn = (table[c].to_numpy() for c in ("traj", "w", "agnostic"))
    n_traj = int(traj[-1]) + 1
    print(f"table: {len(table):,} tokens, {n_traj:,} trajectories, float32 weights")

    trajectory_diagnostics(traj, w, agn)  # warm-up: first touch of fresh memory is page faults, not work
    times, ours = _timed(lambda: trajectory_diagnostics(traj, w, agn), repeats)
    best, median = min(times), statistics.median(times)
    rate = len(table) / best
    print(
        f"trajectory_diagnostics: best {best:.3f} s, median {median:.3f} s of {repeats} -> "
        f"{rate / 1e6:.1f}M tokens/s (best), {len(table) / median / 1e6:.1f}M (median)"
    )
    if not args.quick:
        order = np.random.default_rng(args.seed).permutation(len(table))
        shuffled = (traj[order], w[order], agn[order])
        t_shuf, _ = _timed(lambda: trajectory_diagnostics(*shuffled), 3)
        print(f"  interleaved rows (radix-sort grouping path): {len(table) / min(t_shuf) / 1e6:.1f}M tokens/s")

    picked = np.random.default_rng(args.seed + 1).choice(n_traj, size=min(sub_traj, n_traj), replace=False)
    sub = table[np.isin(traj, picked)]
    print(
        f"pandas baselines on a subsample of {len(sub):,} tokens in {len(picked)} whole trajectories, "
        "extrapolated per token to the full table:"
    )
    rates = {}
    for name, fn in (("pandas", _pandas_metrics), ("pandas+numpy", _numpy_in_apply_metrics)):
        t_pd, base = _timed(lambda fn=fn: pandas_baseline(sub, fn), 1 if args.quick else 2)
        _check_agree(ours, base, name)
        rates[name] = len(sub) / min(t_pd)
        print(
            f"  {name:13s} groupby-apply: {min(t_pd):.2f} s -> {rates[name] / 1e6:.3f}M tokens/s, "
            f"ours is {rate / rates[name]:.0f}x faster; agrees on every trajectory (rtol 1e-9)"
        )
    print(f"diagnostics: {rate / 1e6:.1f}M tokens/s, {rate / rates['pandas']:.0f}x pandas")


if __name__ == "__main__":
    main()
