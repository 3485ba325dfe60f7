"""What the trainer logs about the weights its loss receives (`credit/<name>` in TRL's log): per-trajectory
concentration (SPEC 5) summed over the micro-batch, ready to be added up across processes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from arca.credit.diagnostics import effective_token_ratio, gini, regime

# Metrics added to TRL's log (as `credit/<name>`), means over the trajectories of each logging window.
CREDIT_METRICS = ("gini", "etr", "frac_uniform", "frac_middle", "frac_concentrated", "fallback_rate", "max_weight")
# SPEC 5's default regime thresholds, fixed for the logged `frac_*`: the analysis thresholds are params of the
# diagnose stage, which recomputes regimes from the dumps.
ETR_UNIFORM, ETR_CONCENTRATED = 0.95, 0.25


def credit_sums(weights: Tensor, mask: Tensor, fallback: Tensor) -> np.ndarray:
    """Sums over the trajectories that have tokens of the first six `CREDIT_METRICS`, then that count.

    Args:
        weights: (B, T) weights. mask: (B, T) loss mask. fallback: (B,) rows that fell back to uniform.

    Returns:
        (7,) float64: gini, etr, frac_uniform, frac_middle, frac_concentrated and fallback sums, and the number
        of trajectories with at least one token (empty rows are not counted).
    """
    etr = effective_token_ratio(weights, mask)  # (B,)
    labels = regime(etr, ETR_UNIFORM, ETR_CONCENTRATED)  # (B,)
    has_tokens = np.asarray(mask.sum(1).cpu() > 0, dtype=np.float64)  # (B,)
    per_row = np.stack(
        [
            gini(weights, mask),
            etr,
            labels == "uniform",
            labels == "middle",
            labels == "concentrated",
            fallback.cpu().numpy(),
        ],
        axis=1,
    )  # (B, 6)
    return np.concatenate([(per_row * has_tokens[:, None]).sum(0), [has_tokens.sum()]])


def credit_means(
    weights: Tensor, mask: Tensor, fallback: Tensor, gather: Callable[[Tensor], Tensor], device: torch.device
) -> dict[str, float]:
    """`CREDIT_METRICS` name -> mean over the trajectories of every process (`gather`: the accelerator's), and the
    largest weight of any."""
    local = torch.as_tensor(credit_sums(weights, mask, fallback), dtype=torch.float64, device=device)  # (7,)
    totals = gather(local[None]).sum(0)  # (7,)
    means = (totals[:-1] / totals[-1].clamp_min(1.0)).tolist()
    max_weight = gather(weights.detach().amax().reshape(1).float().to(device)).max().item()
    return dict(zip(CREDIT_METRICS, [*means, max_weight]))
