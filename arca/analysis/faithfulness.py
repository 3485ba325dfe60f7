"""Counterfactual faithfulness (SPEC 9): does a signal's weight sit on the tokens whose change flips the reward?

`faithfulness_scores` scores one signal on many completions at once: per completion the AUC of its weights
for decisive vs non-decisive scored positions, their lift over the mean, and the decisive share of its
heaviest positions. `completion_scores` and `summarize` turn a dump and its counterfactual effects into one
row per signal x run x step, each signal beside its own within-completion permutation (`<s> (permuted)`),
which must land at chance (auc 0.5, lift 1): if it does not, the metric is broken, not the signal.

Left out: any test of one signal against another (the intervals are per row; compare them side by side).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from arca.analysis.stats import BOOTSTRAP_SAMPLES, paired_bootstrap_interval

TOP_FRAC = 0.05  # top_hit looks at the ceil(TOP_FRAC * n_scored) heaviest scored positions (SPEC 5's top-k)
METRICS = ("auc", "lift", "top_hit")
PERMUTED = " (permuted)"
KEYS = ["prompt_id", "sample"]  # one completion of a dump at one step


def faithfulness_scores(weights: Tensor, decisive: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per completion: how well its weights pick out the decisive scored positions.

    Args:
        weights: (N, T) float weights `w_s` of one signal, >= 0.
        decisive: (N, T) bool, True where the counterfactual effect is non-zero.
        mask: (N, T) bool, True at scored positions (the positions that had counterfactual decodes).

    Returns:
        "auc", "lift", "top_hit": (N,) float64. NaN for a row without both a decisive and a non-decisive
        scored position. `auc` = P(w at a decisive > w at a non-decisive scored position), ties count 1/2, so
        equal weights give exactly 0.5. `lift` = mean w over decisive / mean w over scored positions (equal
        weights: 1; NaN where every scored weight is 0). `top_hit` = share of the k = ceil(0.05 * n_scored)
        heaviest scored positions that are decisive. Ties at the cut are broken by their expected value under
        a uniformly random order of the tied positions (the k - g slots left after the g strictly heavier
        positions are filled in proportion to the decisive share of the tied group), so equal weights give
        exactly the decisive share instead of whatever position order a sort happens to keep.
    """
    if not (weights.shape == decisive.shape == mask.shape) or weights.dim() != 2:
        raise ValueError(
            f"weights, decisive, mask: need equal (N, T) shapes, got {weights.shape}, {decisive.shape}, {mask.shape}"
        )
    w = weights.double()
    mask = mask.bool()
    dec = decisive.bool() & mask  # (N, T)
    non = ~decisive.bool() & mask  # (N, T)
    n_dec, n_non = dec.sum(1), non.sum(1)  # (N,)
    valid = (n_dec > 0) & (n_non > 0)
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    # auc: for each decisive weight, how many non-decisive weights lie below it (and tie with it), by binary
    # search in the row's sorted non-decisive weights (+inf elsewhere, above every finite weight).
    sorted_non = torch.where(non, w, inf).sort(dim=1).values  # (N, T)
    below = torch.searchsorted(sorted_non, w.contiguous(), right=False)  # (N, T)
    at_or_below = torch.searchsorted(sorted_non, w.contiguous(), right=True)
    at_or_below = torch.minimum(at_or_below, n_non[:, None])  # a decisive +inf never counts the padding
    wins = torch.where(dec, below + 0.5 * (at_or_below - below), torch.zeros_like(w)).sum(1)  # (N,)
    auc = wins / (n_dec * n_non).clamp(min=1)
    # lift: mean over decisive / mean over scored
    n_scored = mask.sum(1)
    mean_dec = torch.where(dec, w, 0).sum(1) / n_dec.clamp(min=1)
    mean_all = torch.where(mask, w, 0).sum(1) / n_scored.clamp(min=1)
    lift = torch.where(mean_all > 0, mean_dec / mean_all.clamp(min=torch.finfo(w.dtype).tiny), torch.nan)
    top_hit = _top_hit(w, dec, mask, n_scored)
    nan = torch.tensor(float("nan"), dtype=w.dtype, device=w.device)
    return {
        name: torch.where(valid, value, nan) for name, value in (("auc", auc), ("lift", lift), ("top_hit", top_hit))
    }


def _top_hit(w: Tensor, dec: Tensor, mask: Tensor, n_scored: Tensor) -> Tensor:
    """(N,) decisive share of the ceil(TOP_FRAC * n_scored) heaviest scored positions, ties at the cut in
    expectation (see `faithfulness_scores`). w, dec, mask: (N, T)."""
    k = torch.ceil(TOP_FRAC * n_scored.double()).long().clamp(min=1)  # (N,)
    ranked = torch.where(mask, w, -torch.inf).sort(dim=1, descending=True).values  # (N, T)
    cut = ranked.gather(1, (k - 1).clamp(max=w.shape[1] - 1)[:, None])  # (N, 1): the k-th heaviest weight
    above, tied = mask & (w > cut), mask & (w == cut)  # (N, T)
    n_above, n_tied = above.sum(1), tied.sum(1)
    tied_dec = (tied & dec).sum(1)
    hits = (above & dec).sum(1).double() + (k - n_above).double() * tied_dec.double() / n_tied.clamp(min=1).double()
    return hits / k.double()


def permuted_weights(weights: Tensor, valid: Tensor, generator: torch.Generator) -> Tensor:
    """Each row's weights permuted uniformly at random over its valid positions (SPEC 3's permutation
    control), padding left in place: the same concentration, positions forgotten.

    Args:
        weights: (N, T) float; valid: (N, T) bool, the completion's valid tokens.
        generator: seeded generator (one draw of (N, T) keys).
    """
    keys = torch.rand(weights.shape, generator=generator, dtype=torch.float64)
    keys = torch.where(valid.bool(), keys, 2.0)  # invalid positions sort last
    shuffled = keys.argsort(dim=1)  # (N, T): valid positions in random order first
    in_order = (~valid.bool()).long().argsort(dim=1, stable=True)  # (N, T): valid positions in order first
    out = weights.clone()
    out.scatter_(1, in_order, weights.gather(1, shuffled))
    return torch.where(valid.bool(), out, weights)


def completion_grid(dump: pd.DataFrame, effects: pd.DataFrame, signals: Sequence[str]) -> dict[str, object]:
    """One step of one run as (N, T) tensors: completions (sorted by prompt_id, sample) x positions.

    Args:
        dump: the dump rows of one run and step (SPEC 6: prompt_id, sample, pos, w_<s>).
        effects: the counterfactual rows of the same run and step (prompt_id, sample, pos, decisive).
        signals: signals whose `w_<s>` to read.

    Returns:
        keys (DataFrame of the N completions), weights (name -> (N, T) float64), valid, scored, decisive
        ((N, T) bool).
    """
    keys = dump[KEYS].drop_duplicates().sort_values(KEYS).reset_index(drop=True)
    index = pd.MultiIndex.from_frame(keys)
    width = int(dump["pos"].max()) + 1
    row = index.get_indexer(pd.MultiIndex.from_frame(dump[KEYS]))
    pos = dump["pos"].to_numpy()
    shape = (len(keys), width)
    valid = np.zeros(shape, dtype=bool)
    valid[row, pos] = True
    weights = {}
    for name in signals:
        grid = np.zeros(shape)
        grid[row, pos] = dump[f"w_{name}"].to_numpy(dtype=np.float64)
        weights[name] = torch.from_numpy(grid)
    scored, decisive = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    erow = index.get_indexer(pd.MultiIndex.from_frame(effects[KEYS]))
    if (erow < 0).any():
        raise ValueError("effects: rows for completions the dump does not hold; rerun the faithfulness stage")
    scored[erow, effects["pos"].to_numpy()] = True
    decisive[erow, effects["pos"].to_numpy()] = effects["decisive"].to_numpy(dtype=bool)
    return {
        "keys": keys,
        "weights": weights,
        "valid": torch.from_numpy(valid),
        "scored": torch.from_numpy(scored),
        "decisive": torch.from_numpy(decisive),
    }


def completion_scores(dump: pd.DataFrame, effects: pd.DataFrame, signals: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """One row per signal (and its `<s> (permuted)` control) x completion of one run and step: auc, lift,
    top_hit (NaN where not counted), n_scored, n_decisive. The permutation is seeded by `seed` alone, one
    generator per signal in `signals` order, so a rerun gives the same rows."""
    grid = completion_grid(dump, effects, signals)
    scored, decisive = grid["scored"], grid["decisive"]
    base = grid["keys"].assign(n_scored=scored.sum(1).numpy(), n_decisive=(decisive & scored).sum(1).numpy())
    frames = []
    for i, name in enumerate(signals):
        w = grid["weights"][name]
        permuted = permuted_weights(w, grid["valid"], torch.Generator().manual_seed(seed * 1_000_003 + i))
        for label, weights in ((name, w), (name + PERMUTED, permuted)):
            scores = faithfulness_scores(weights, decisive, scored)
            frames.append(base.assign(signal=label, **{m: scores[m].numpy() for m in METRICS}))
    return pd.concat(frames, ignore_index=True)


def summarize(scores: pd.DataFrame, *, bootstrap_samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> pd.DataFrame:
    """One row per signal x run x step: each metric's mean over the counted completions (both a decisive and
    a non-decisive scored position) with a seeded 95% percentile bootstrap interval over completions
    (`<m>_lo`, `<m>_hi`), `completions` counted of `completions_total`, and `decisive_share`: the mean over
    counted completions of their decisive share of scored positions (top_hit's chance level).

    Args:
        scores: `completion_scores` rows with `run` and `step` columns added.
    """
    rows = []
    for (run, step, signal), part in scores.groupby(["run", "step", "signal"], sort=True):
        counted = part[part["auc"].notna()]
        row: dict[str, object] = {"signal": signal, "run": run, "step": int(step)}
        for metric in METRICS:
            values = counted[metric].to_numpy(dtype=float)
            values = values[np.isfinite(values)]  # lift is undefined where every scored weight is 0
            mean, low, high = _mean_interval(values, bootstrap_samples, seed)
            row |= {metric: mean, f"{metric}_lo": low, f"{metric}_hi": high}
        share = (counted["n_decisive"] / counted["n_scored"]).to_numpy(dtype=float)
        row |= {
            "decisive_share": float(share.mean()) if share.size else math.nan,
            "completions": len(counted),
            "completions_total": len(part),
            "positions": int(part["n_scored"].sum()),
            "decisive_positions": int(part["n_decisive"].sum()),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_interval(values: np.ndarray, samples: int, seed: int) -> tuple[float, float, float]:
    """Mean and seeded 95% bootstrap interval over completions; NaN x 3 when none is counted."""
    if values.size == 0:
        return math.nan, math.nan, math.nan
    low, high = paired_bootstrap_interval(values, samples=samples, seed=seed)  # a percentile bootstrap of the mean
    return float(values.mean()), low, high
