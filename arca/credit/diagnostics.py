"""Concentration diagnostics of credit weights (SPEC section 5): per-trajectory Gini, effective-token
ratio, top-k mass, agnostic share and regime, on padded batches or on the flat per-token table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

REGIMES = ("uniform", "middle", "concentrated")
METRICS = ("gini", "etr", "top_k_mass", "agnostic_share")
_MIN_WIDTH = 16  # narrowest padded row in the flat-table sort; tiny rows are not worth their own bucket
_CHUNK_TOKENS = 1 << 18  # flat-table work unit: a few MB per array, so consecutive passes hit the cache


# ---------------------------------------------------------------------------------------------------------
# Padded (B, T) batches: straightforward row-wise numpy, also the reference the flat table is tested against.


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _batch(weights, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and return float64 weights with padding zeroed, the bool mask and `T` per row."""
    w = _to_numpy(weights)
    m = _to_numpy(mask)
    if w.ndim != 2:
        raise ValueError(f"weights: expected a 2-D (B, T) array, got shape {w.shape}")
    if m.shape != w.shape:
        raise ValueError(f"mask: shape {m.shape} does not match weights {w.shape}")
    m = m != 0
    w = np.where(m, w.astype(np.float64), 0.0)  # (B, T)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights: must be finite and >= 0 on valid tokens (drop fallback rows of raw a)")
    return w, m, m.sum(axis=1)


def _top_k(n_tokens: np.ndarray, frac: float) -> np.ndarray:
    """`ceil(frac * T)`; rounding first absorbs float error such as 0.05 * 60 = 3.0000000000000004."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac: top-k fraction must be in (0, 1], got {frac}")
    return np.ceil(np.round(frac * n_tokens, 9)).astype(np.int64)


def _sorted_valid(w: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Each row sorted ascending with its valid weights first and zeros after them."""
    s = np.sort(np.where(m, w, np.inf), axis=1)  # (B, T)
    return np.where(np.isfinite(s), s, 0.0)


def gini(weights, mask) -> np.ndarray:
    """Gini coefficient per row: `2 sum_i i w_(i) / (T sum w) - (T + 1) / T`, 0 when `T <= 1` or `sum w = 0`.

    Args:
        weights: `(B, T)` weights (or raw saliences), `>= 0` and finite on valid tokens; numpy or torch.
        mask: `(B, T)` validity mask.

    Returns:
        `(B,)` float64, in `[0, 1 - 1/T]`.
    """
    w, m, n = _batch(weights, mask)
    s = _sorted_valid(w, m)  # (B, T) ascending, valid first
    i = np.arange(1, w.shape[1] + 1)  # (T,)
    return _gini_from_sums(n, s.sum(axis=1), (s * i).sum(axis=1))


def _gini_from_sums(n: np.ndarray, total: np.ndarray, weighted: np.ndarray) -> np.ndarray:
    """Gini from `T`, `sum w` and `sum_i i w_(i)`, clipped to its exact range to drop float noise."""
    ok = (total > 0) & (n > 1)
    n_safe = np.maximum(n, 1)
    g = np.where(ok, 2 * weighted / (n_safe * np.where(ok, total, 1.0)) - (n_safe + 1) / n_safe, 0.0)
    return np.clip(g, 0.0, 1.0 - 1.0 / n_safe)


def effective_token_ratio(weights, mask) -> np.ndarray:
    """`(sum w)^2 / (T sum w^2)` per row, in `[1/T, 1]`; 1 when `sum w = 0` (treated as uniform fallback).

    Args:
        weights: `(B, T)` weights, `>= 0` and finite on valid tokens.
        mask: `(B, T)` validity mask.

    Returns:
        `(B,)` float64; rows with no valid token get 1.
    """
    w, _, n = _batch(weights, mask)
    return _etr_from_sums(n, w.sum(axis=1), (w * w).sum(axis=1))


def _etr_from_sums(n: np.ndarray, total: np.ndarray, sq: np.ndarray) -> np.ndarray:
    # sq > 0 also guards weights so tiny (< 1e-154, float64 only) that their squares underflow to 0.
    ok = (total > 0) & (n > 0) & (sq > 0)
    n_safe = np.maximum(n, 1)
    etr = np.where(ok, total**2 / (n_safe * np.where(ok, sq, 1.0)), 1.0)
    return np.clip(etr, 1.0 / n_safe, 1.0)


def top_k_mass(weights, mask, frac: float = 0.05) -> np.ndarray:
    """Share of each row's weight on its `ceil(frac * T)` heaviest tokens.

    A row with `sum w = 0` is read as uniform (share `k / T`); a row with no valid token gets 0.

    Args:
        weights: `(B, T)` weights, `>= 0` and finite on valid tokens.
        mask: `(B, T)` validity mask.
        frac: fraction of tokens, in `(0, 1]`.

    Returns:
        `(B,)` float64 in `[0, 1]`.
    """
    w, m, n = _batch(weights, mask)
    k = _top_k(n, frac)  # (B,)
    s = _sorted_valid(w, m)  # (B, T)
    col = np.arange(w.shape[1])[None, :]  # (1, T)
    top = np.where((col >= (n - k)[:, None]) & (col < n[:, None]), s, 0.0).sum(axis=1)  # (B,)
    return _share(top, s.sum(axis=1), k, n)


def _share(part: np.ndarray, total: np.ndarray, count_if_uniform: np.ndarray, n: np.ndarray) -> np.ndarray:
    """`part / total`, or `count / T` where `total = 0` (uniform reading), 0 where `T = 0`."""
    uniform = np.where(n > 0, count_if_uniform / np.maximum(n, 1), 0.0)
    return np.where(total > 0, part / np.where(total > 0, total, 1.0), uniform)


def agnostic_share(weights, mask, agnostic) -> np.ndarray:
    """Share of each row's weight on task-agnostic tokens (see `agnostic_tokens`).

    Args:
        weights: `(B, T)` weights, `>= 0` and finite on valid tokens.
        mask: `(B, T)` validity mask.
        agnostic: `(B, T)` bool, True on task-agnostic tokens; ignored on padding.

    Returns:
        `(B,)` float64 in `[0, 1]`; `sum w = 0` rows give the agnostic token fraction, empty rows 0.
    """
    w, m, n = _batch(weights, mask)
    agn = _to_numpy(agnostic)
    if agn.shape != w.shape:
        raise ValueError(f"agnostic: shape {agn.shape} does not match weights {w.shape}")
    agn = (agn != 0) & m  # (B, T)
    return _share(np.where(agn, w, 0.0).sum(axis=1), w.sum(axis=1), agn.sum(axis=1), n)


def regime(etr, etr_uniform: float = 0.95, etr_concentrated: float = 0.25) -> np.ndarray:
    """Label each ETR: `uniform` if `>= etr_uniform`, `concentrated` if `<= etr_concentrated`, else `middle`.

    Args:
        etr: `(B,)` effective-token ratios.
        etr_uniform: lower ETR bound of the uniform regime.
        etr_concentrated: upper ETR bound of the concentrated regime, `< etr_uniform`.

    Returns:
        `(B,)` object array of regime names.
    """
    if not etr_concentrated < etr_uniform:
        raise ValueError(f"etr_concentrated: must be < etr_uniform, got {etr_concentrated} >= {etr_uniform}")
    e = np.asarray(_to_numpy(etr), dtype=np.float64)
    codes = np.where(e >= etr_uniform, 0, np.where(e <= etr_concentrated, 2, 1))
    return np.asarray(REGIMES, dtype=object)[codes]


# ---------------------------------------------------------------------------------------------------------
# Flat per-token table: trajectories sorted as padded rows in a few 2-D blocks, then segment sums.


def _check_flat(traj, weights, agnostic) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    t = _to_numpy(traj)
    w = _to_numpy(weights)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"traj: expected a 1-D integer array of trajectory ids, got {t.dtype} {t.shape}")
    if w.shape != t.shape:
        raise ValueError(f"weights: shape {w.shape} does not match traj {t.shape}")
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float64)
    if len(w) and not (w.min() >= 0 and w.max() < np.inf):  # min() is NaN if any NaN
        raise ValueError("weights: must be finite and >= 0 (drop fallback rows of raw saliences first)")
    if agnostic is None:
        return t, w, None
    a = _to_numpy(agnostic)
    if a.shape != t.shape:
        raise ValueError(f"agnostic: shape {a.shape} does not match traj {t.shape}")
    return t, w, a != 0


def _runs(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal consecutive ids."""
    starts = np.concatenate(([0], np.flatnonzero(t[1:] != t[:-1]) + 1))
    return starts, np.diff(np.append(starts, len(t)))


def _grouping_order(t: np.ndarray) -> np.ndarray:
    """A permutation that makes every id's tokens contiguous (ascending ids), by LSD radix sort.

    numpy's stable argsort is a radix sort for 16-bit keys, several times faster than a comparison argsort of
    int64; ids are offset to start at 0 (or made dense when their span is huge) and sorted 16 bits per pass,
    so up to 65,536 distinct ids take a single pass.
    """
    span = int(t.max()) - int(t.min())
    if span < 1 << 48:
        key = (t - t.min()).astype(np.uint64)  # no overflow: span fits
    else:
        key = np.unique(t, return_inverse=True)[1].astype(np.uint64)
        span = int(key.max())
    order = None
    for shift in range(0, max(span.bit_length(), 1), 16):
        digit = ((key if order is None else key[order]) >> np.uint64(shift)).astype(np.uint16)  # low 16 bits
        step = np.argsort(digit, kind="stable")
        order = step if order is None else order[step]
    return order


def _row_widths(lengths: np.ndarray) -> np.ndarray:
    """Padded row width per segment: `T` rounded up to a multiple of an eighth of its power of two.

    Padding stays under 1/8 of the data while the number of distinct widths (2-D blocks to sort) stays
    at most 8 per doubling of `T`.
    """
    n = np.maximum(lengths, 1)
    quantum = np.maximum(1 << np.maximum(np.floor(np.log2(n)).astype(np.int64) - 3, 0), _MIN_WIDTH)
    return -(-n // quantum) * quantum


def _segment_positions(starts: np.ndarray, lengths: np.ndarray, first: np.ndarray) -> np.ndarray:
    """`first[g] + (i - starts[g])` for every token `i` of segment `g`, by one cumsum (cheaper than repeat)."""
    steps = np.ones(int(lengths.sum()), dtype=np.int64)  # (N,)
    steps[0] = first[0]
    steps[starts[1:]] = first[1:] - (first[:-1] + lengths[:-1] - 1)
    return np.cumsum(steps, out=steps)


def _sort_segments(w: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sort each contiguous segment of `w` ascending, all at once.

    Segments are scattered into padded rows (padding +inf sorts last), rows of equal width are sorted as
    one 2-D block with numpy's SIMD row sort (several times faster than one global sort of 10M keys,
    since each row is small), and the sorted values are gathered back. Exact: no key packing.
    """
    width = _row_widths(lengths)  # (G,)
    by_width = np.argsort(width, kind="stable")  # (G,)
    base = np.empty_like(width)
    base[by_width] = np.concatenate(([0], np.cumsum(width[by_width])[:-1]))  # (G,) row start in buffer
    dest = _segment_positions(starts, lengths, base)  # (N,) token -> slot in its padded row
    buf = np.full(int(width.sum()), np.inf, dtype=w.dtype)
    buf[dest] = w
    sorted_widths = width[by_width]
    edges = np.flatnonzero(np.diff(sorted_widths)) + 1
    for first, last in zip(np.append(0, edges), np.append(edges, len(width)), strict=True):
        w_b = int(sorted_widths[first])
        lo, hi = int(base[by_width[first]]), int(base[by_width[last - 1]]) + w_b
        buf[lo:hi].reshape(-1, w_b).sort(axis=1)  # one block per distinct width
    return buf[dest]


def _segment_stats(w, agn, starts, lengths, frac) -> dict[str, np.ndarray]:
    """Metrics of each contiguous segment (one trajectory each)."""
    s = _sort_segments(w, starts, lengths).astype(np.float64)  # (N,) ascending within each trajectory
    k = _top_k(lengths, frac)  # (G,)
    # reduceat over interleaved [start, start + T - k) pairs: every second sum is the top-k mass.
    split = np.empty(2 * len(starts), dtype=np.int64)
    split[0::2], split[1::2] = starts, starts + lengths - k
    pair_sums = np.add.reduceat(s, split)
    total = np.add.reduceat(s, starts)  # (G,)
    rank = _segment_positions(starts, lengths, np.ones_like(starts)).astype(np.float64)  # (N,) 1..T
    out = {
        "gini": _gini_from_sums(lengths, total, np.add.reduceat(np.multiply(s, rank, out=rank), starts)),
        "etr": _etr_from_sums(lengths, total, np.add.reduceat(np.multiply(s, s, out=s), starts)),
        "top_k_mass": _share(pair_sums[1::2], total, k, lengths),
    }
    if agn is None:
        out["agnostic_share"] = np.full(len(starts), np.nan)
    else:
        part = np.add.reduceat(np.multiply(w, agn, dtype=np.float64), starts)  # order within a segment is irrelevant
        # Token counts only matter for all-zero trajectories (read as uniform); skip the pass otherwise.
        count = np.add.reduceat(agn, starts, dtype=np.int64) if (total <= 0).any() else np.zeros_like(total)
        out["agnostic_share"] = _share(part, total, count, lengths)
    return out


def _chunked_stats(w, agn, starts, lengths, frac) -> dict[str, np.ndarray]:
    """`_segment_stats` over runs of whole trajectories of about `_CHUNK_TOKENS` tokens each.

    Each pass over a chunk then stays in cache; on a 10M-token table this is about 2x faster than one pass
    over everything. The loop is over chunks (~40 for 10M tokens), never over trajectories.
    """
    chunk = _CHUNK_TOKENS  # read at call time so tests can shrink it
    cuts = np.unique(np.searchsorted(starts, np.arange(chunk, len(w), chunk)))
    bounds = np.concatenate(([0], cuts[cuts < len(starts)], [len(starts)]))  # segment index bounds
    token_bounds = np.append(starts, len(w))[bounds]
    parts = [
        _segment_stats(w[lo:hi], None if agn is None else agn[lo:hi], starts[g0:g1] - lo, lengths[g0:g1], frac)
        for g0, g1, lo, hi in zip(bounds[:-1], bounds[1:], token_bounds[:-1], token_bounds[1:], strict=True)
    ]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def trajectory_diagnostics(
    traj: np.ndarray,
    weights: np.ndarray,
    agnostic: np.ndarray | None = None,
    *,
    top_frac: float = 0.05,
    etr_uniform: float = 0.95,
    etr_concentrated: float = 0.25,
) -> pd.DataFrame:
    """Per-trajectory diagnostics of a flat per-token table (e.g. one `w_<signal>` column of a dump).

    Vectorized over trajectories. Tokens of one trajectory are usually contiguous (ids in any order);
    a table whose trajectories are interleaved is first grouped by a radix sort over `traj` (slower, see
    `_grouping_order`). Exact, not approximate: each trajectory is truly sorted (no packed sort keys), and
    sums are float64, so results equal the padded `(B, T)` functions up to summation order (~1e-15).

    Args:
        traj: `(N,)` integer trajectory id of each token.
        weights: `(N,)` weights (or raw saliences), finite and `>= 0`.
        agnostic: optional `(N,)` bool task-agnostic flags; without it `agnostic_share` is NaN.
        top_frac: fraction of tokens for `top_k_mass`.
        etr_uniform: see `regime`.
        etr_concentrated: see `regime`.

    Returns:
        One row per trajectory sorted by `traj`: `traj, T, gini, etr, top_k_mass, agnostic_share, regime`.
    """
    t, w, agn = _check_flat(traj, weights, agnostic)
    _top_k(np.zeros(1), top_frac)  # validates top_frac even for an empty table
    regime(np.zeros(0), etr_uniform, etr_concentrated)  # validates the thresholds likewise
    if len(t) == 0:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in _EMPTY_COLUMNS.items()})
    starts, lengths = _runs(t)
    ids = t[starts]
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all() and len(np.unique(ids)) < len(ids):
        order = _grouping_order(t)  # some trajectory is split over several runs
        t, w = t[order], w[order]
        agn = None if agn is None else agn[order]
        starts, lengths = _runs(t)
        ids = t[starts]
    stats = _chunked_stats(w, agn, starts, lengths, top_frac)
    table = pd.DataFrame({"traj": ids, "T": lengths, **stats})
    table["regime"] = regime(table["etr"].to_numpy(), etr_uniform, etr_concentrated)
    return table.sort_values("traj", kind="stable", ignore_index=True)


_EMPTY_COLUMNS = {"traj": "int64", "T": "int64", **dict.fromkeys(METRICS, "float64"), "regime": "str"}


def aggregate(
    per_traj: pd.DataFrame,
    by: Sequence[str],
    metrics: Sequence[str] = METRICS,
) -> pd.DataFrame:
    """Summaries over trajectories per group (e.g. signal x run x checkpoint).

    Args:
        per_traj: output of `trajectory_diagnostics` with the `by` columns added.
        by: grouping columns; empty means one row over everything.
        metrics: metric columns to summarize.

    Returns:
        One row per group: the `by` columns, `n`, `<m>_mean`, `<m>_median`, `<m>_p10`, `<m>_p90` per
        metric (NaNs skipped), and `frac_uniform`, `frac_middle`, `frac_concentrated`.
    """
    by = list(by)
    missing = [c for c in by if c not in per_traj.columns]
    if missing:
        raise ValueError(f"by: columns {missing} not in per_traj (has {list(per_traj.columns)})")
    missing = [c for c in (*metrics, "regime") if c not in per_traj.columns]
    if missing:
        raise ValueError(f"metrics: columns {missing} not in per_traj (has {list(per_traj.columns)})")
    frame = per_traj.assign(_all=0) if not by else per_traj
    keys = by or ["_all"]
    groups = frame.groupby(keys, sort=True, dropna=False, observed=True)
    parts = {"n": groups.size()}
    for m in metrics:
        col = groups[m]
        parts[f"{m}_mean"] = col.mean()
        parts[f"{m}_median"] = col.median()
        parts[f"{m}_p10"] = col.quantile(0.1)
        parts[f"{m}_p90"] = col.quantile(0.9)
    for name in REGIMES:
        parts[f"frac_{name}"] = frame["regime"].eq(name).groupby([frame[c] for c in keys], dropna=False).mean()
    out = pd.DataFrame(parts).reset_index()
    return out.drop(columns="_all") if not by else out
