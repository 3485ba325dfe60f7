"""Turn raw per-token saliences into credit weights that sum to the trajectory length (SPEC section 3), and
permute them within each trajectory for the permutation control (SPEC 3 `permute`).

Every function works row-wise on padded batches `(B, T)` with a validity mask and returns float32 tensors;
numpy inputs are accepted and converted. Arithmetic runs in float64 so row sums stay at `T` to float32
precision whatever the scheme.
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import torch
from torch import Tensor

from arca.methods import FALLBACKS, SCHEMES

logger = logging.getLogger(__name__)

# SCHEMES and FALLBACKS (arca.methods). Which scores the degenerate-row test reads (SPEC 3): `raw_mean` the raw
# saliences, `sum(a) <= eps * T`; `sharpened_sum` the sharpened scores the scheme sees, `sum_t (a_t + eps)^p <= eps`
# (the ARCA paper's code).


def _as_tensor(x: Tensor | np.ndarray, name: str) -> Tensor:
    """Accept a torch tensor or a numpy array (or nested list); reject anything that is not 2-D."""
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))  # CPU, whatever the default device
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (B, T) array, got shape {tuple(t.shape)}")
    return t


def _prepare(saliences, mask) -> tuple[Tensor, Tensor]:
    """Validate shapes and return `(a, m)`: float64 saliences with padding zeroed, and a bool mask."""
    a = _as_tensor(saliences, "saliences")
    m = _as_tensor(mask, "mask")
    if a.shape != m.shape:
        raise ValueError(f"mask: shape {tuple(m.shape)} does not match saliences {tuple(a.shape)}")
    m = m.to(a.device) != 0  # (B, T) bool; accepts 0/1 ints and floats too
    a = torch.where(m, a.to(torch.float64), 0.0)  # (B, T); padding may hold garbage, never read it
    return a, m


def _prepare_weights(weights, mask) -> tuple[Tensor, Tensor]:
    w, m = _prepare(weights, mask)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights: must be finite and >= 0 on valid tokens (normalize saliences first)")
    return w, m


def degenerate_rows(
    saliences: Tensor | np.ndarray,
    mask: Tensor | np.ndarray,
    eps: float = 1e-8,
    *,
    fallback: str = "raw_mean",
    sharpening: float = 1.0,
) -> Tensor:
    """Rows that must fall back to uniform weights: a non-finite `a` on a valid token, or too little mass.

    `fallback="raw_mean"` (SPEC 3): `sum(a) <= eps * T` on the raw saliences, so an exactly-zero signal falls
    back whatever `p` is. `fallback="sharpened_sum"` (the ARCA paper's code): `sum_t s_t <= eps` on the scores
    the scheme normalizes, `s_t = (a_t + eps)^p` when `p != 1` (`a_t` itself when `p = 1`). The two differ for
    rows of tiny saliences: with `p = 2` a row whose raw mass lies between `eps * T` and about `sqrt(eps)`
    falls back under `sharpened_sum` only. Rows with no valid token (`T = 0`) are not degenerate: they simply
    get no weight at all.

    Args:
        saliences: `(B, T)` raw saliences; values on padding are ignored.
        mask: `(B, T)` validity mask (bool or 0/1).
        eps: the threshold (per token for `raw_mean`, per row for `sharpened_sum`), and sharpening's offset.
        fallback: one of `FALLBACKS`.
        sharpening: exponent `p` of the scores `sharpened_sum` tests; ignored by `raw_mean`.

    Returns:
        `(B,)` bool tensor.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback: unknown rule {fallback!r}, pick one of {FALLBACKS}")
    a, m = _prepare(saliences, mask)
    n_valid = m.sum(dim=1)  # (B,)
    nonfinite = (~torch.isfinite(a) & m).any(dim=1)  # (B,)
    finite = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)  # (B, T)
    if fallback == "raw_mean":
        tiny = finite.sum(dim=1) <= eps * n_valid  # (B,)
    else:
        tiny = _sharpen(finite, m, eps, sharpening).sum(dim=1) <= eps  # (B,)
    return (nonfinite | tiny) & (n_valid > 0)


def _sharpen(a: Tensor, m: Tensor, eps: float, sharpening: float) -> Tensor:
    """`(a + eps)^p` on valid tokens, 0 on padding; `a` unchanged when `p = 1` (sharpening off)."""
    if sharpening == 1.0:
        return a
    return torch.where(m, (a + eps) ** sharpening, 0.0)  # (B, T)


def _rank_weights(a: Tensor, m: Tensor) -> Tensor:
    """Average ranks (1-based, ties share the mean of their positions) on valid tokens, 0 on padding.

    Vectorized over rows: sort each row with padding pushed to the end as +inf, find runs of equal values,
    give each run the mean of its first and last position, and scatter back.
    """
    key = torch.where(m, torch.nan_to_num(a, nan=0.0), torch.inf)  # (B, L); padding sorts last
    sorted_vals, order = torch.sort(key, dim=1)  # (B, L)
    B, L = key.shape
    pos = torch.arange(1, L + 1, dtype=torch.float64, device=a.device).expand(B, L)  # (B, L)
    new_run = torch.ones_like(sorted_vals, dtype=torch.bool)  # (B, L)
    new_run[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    run_start = torch.cummax(torch.where(new_run, pos, 0.0), dim=1).values  # (B, L) first position of run
    run_id = torch.cumsum(new_run.long(), dim=1) - 1  # (B, L)
    run_len = torch.zeros(B, L, dtype=torch.float64, device=a.device).scatter_add_(1, run_id, torch.ones_like(pos))
    avg_rank = run_start + (run_len.gather(1, run_id) - 1) / 2  # (B, L)
    ranks = torch.empty_like(avg_rank).scatter_(1, order, avg_rank)  # (B, L) back in token order
    return torch.where(m, ranks, 0.0)


def _scheme_weights(a: Tensor, m: Tensor, scheme: str, tau: float) -> Tensor:
    """Raw scheme output, scaled to sum `T` per row; rows that will fall back may hold garbage here."""
    n_valid = m.sum(dim=1, keepdim=True).to(torch.float64)  # (B, 1)
    if scheme == "mean":
        w = a * n_valid / a.sum(dim=1, keepdim=True)  # (B, T)
    elif scheme == "softmax":
        logits = torch.where(m, a / tau, -torch.inf)  # (B, T); softmax over valid tokens only
        w = n_valid * torch.softmax(logits, dim=1)  # (B, T); all-padding rows become NaN, masked below
    else:
        ranks = _rank_weights(a, m)  # (B, T)
        w = ranks * n_valid / ranks.sum(dim=1, keepdim=True)  # (B, T)
    return torch.where(m, w, 0.0)


def _check_options(
    scheme: str, tau: float, eps: float, mix: float, w_max: float | None, sharpening: float, fallback: str
) -> None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback: unknown rule {fallback!r}, pick one of {FALLBACKS}")
    if not (math.isfinite(sharpening) and sharpening > 0):
        raise ValueError(f"sharpening: exponent p must be finite and > 0, got {sharpening}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown scheme {scheme!r}, pick one of {SCHEMES}")
    if not tau > 0:
        raise ValueError(f"tau: softmax temperature must be > 0, got {tau}")
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix: lambda must be in [0, 1], got {mix}")
    if w_max is not None and not w_max >= 1.0:
        raise ValueError(f"w_max: must be >= 1 (the mean weight is 1), got {w_max}")


def normalize(
    saliences: Tensor | np.ndarray,
    mask: Tensor | np.ndarray,
    scheme: str = "mean",
    tau: float = 1.0,
    eps: float = 1e-8,
    *,
    mix: float = 1.0,
    w_max: float | None = None,
    sharpening: float = 1.0,
    fallback: str = "raw_mean",
) -> tuple[Tensor, Tensor]:
    """Saliences -> credit weights with mean 1 per trajectory (SPEC section 3).

    Order: degenerate rows are found (see `degenerate_rows`), sharpening `a <- (a + eps)^p` (p != 1), the
    scheme, degenerate rows fall back to uniform, mixing with uniform, the optional clip. Rows with no valid
    token get all-zero weights and no fallback flag. `fallback="raw_mean"` (default, SPEC 3) tests the raw
    saliences, so an exactly-zero signal (ARCA at LoRA B = 0) falls back whatever `p` is; `sharpened_sum`
    tests the sharpened scores as the ARCA paper's code does, and also drops rows of tiny but non-zero
    saliences (raw mass between `eps * T` and about `sqrt(eps)` at `p = 2`) to uniform.

    Args:
        saliences: `(B, T)` raw saliences, `>= 0` on valid tokens; NaN/inf make the row fall back.
        mask: `(B, T)` validity mask (bool or 0/1); padding always gets weight 0.
        scheme: one of `SCHEMES`: `mean` (`a / mean(a)`), `softmax` (`T * softmax(a / tau)`),
            `rank` (average rank, ties shared, scaled to mean 1).
        tau: softmax temperature, `> 0`; ignored by the other schemes.
        eps: degenerate-row threshold, see `degenerate_rows`.
        mix: lambda of `w <- (1 - lambda) + lambda * w`, in `[0, 1]`; 0 is vanilla GRPO.
        w_max: optional cap `>= 1`, applied last by `clip_weights`.
        sharpening: exponent `p > 0` (SPEC 3); 1 is off, the ARCA paper's code uses 2.
        fallback: the degenerate-row rule, one of `FALLBACKS` (see `degenerate_rows`).

    Returns:
        `(weights, fallback)`: `(B, T)` float32 weights summing to `T` per row, and `(B,)` bool flags.
    """
    _check_options(scheme, tau, eps, mix, w_max, sharpening, fallback)
    a, m = _prepare(saliences, mask)
    if bool(((a < 0) & torch.isfinite(a)).any()):
        raise ValueError("saliences: must be >= 0 on valid tokens (clamp signals such as KL at 0 first)")
    degenerate = degenerate_rows(a, m, eps, fallback=fallback, sharpening=sharpening)  # (B,)
    a = _sharpen(a, m, eps, sharpening)  # (B, T)
    w = _scheme_weights(a, m, scheme, tau)  # (B, T)
    w = torch.where(degenerate[:, None], m.to(torch.float64), w)  # (B, T)
    if degenerate.any():
        logger.debug("normalize: %d of %d rows fell back to uniform", int(degenerate.sum()), len(degenerate))
    if mix != 1.0:
        w = _mix(w, m, mix)
    if w_max is not None:
        w = _clip(w, m, w_max)
    return w.to(torch.float32), degenerate


def mix_uniform(weights: Tensor | np.ndarray, mask: Tensor | np.ndarray, lam: float) -> Tensor:
    """Mix with uniform credit: `w <- (1 - lam) + lam * w` on valid tokens, 0 on padding.

    Args:
        weights: `(B, T)` weights, `>= 0` on valid tokens.
        mask: `(B, T)` validity mask.
        lam: mixing weight in `[0, 1]`; 0 gives uniform weights, 1 leaves `weights` unchanged.

    Returns:
        `(B, T)` float32 weights; row sums are preserved when the input rows sum to `T`.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: mixing weight must be in [0, 1], got {lam}")
    w, m = _prepare_weights(weights, mask)
    return _mix(w, m, lam).to(torch.float32)


def _mix(w: Tensor, m: Tensor, lam: float) -> Tensor:
    return torch.where(m, (1.0 - lam) + lam * w, 0.0)  # (B, T)


def clip_weights(weights: Tensor | np.ndarray, mask: Tensor | np.ndarray, w_max: float) -> Tensor:
    """Cap weights at `w_max` and renormalize to mean 1, exactly (water-filling).

    One clip + rescale can push weights back above `w_max`, so the clip is solved in closed form instead:
    find `c` with `sum_t min(w_max, c * w_t) = T`. With weights sorted descending, clipping the top `k`
    tokens gives `c_k = (T - k * w_max) / (sum of the rest)`, and the answer is the smallest `k` whose
    largest unclipped weight stays under the cap. This is the fixed point of iterated clip+renormalize,
    reached in one vectorized pass (the "iterations" are the at most `T` candidate `k` per row). Because
    `w_max >= 1` a solution always exists: zero weights are treated as infinitesimally positive, so if the
    positive tokens all hit the cap and still fall short of `T`, the remainder is spread evenly over the
    zero-weight tokens (each gets at most `w_max`). All-zero rows become uniform. Result: `max <= w_max`
    and mean exactly 1 (up to float32 rounding).

    Args:
        weights: `(B, T)` weights, `>= 0` on valid tokens (any positive scale; the output has mean 1).
        mask: `(B, T)` validity mask.
        w_max: cap, `>= 1`.

    Returns:
        `(B, T)` float32 weights, 0 on padding.
    """
    if not w_max >= 1.0:
        raise ValueError(f"w_max: must be >= 1 (the mean weight is 1), got {w_max}")
    w, m = _prepare_weights(weights, mask)
    return _clip(w, m, w_max).to(torch.float32)


def _clip(w: Tensor, m: Tensor, w_max: float) -> Tensor:
    """Water-filling clip on float64 `(B, T)` weights; see `clip_weights`."""
    B, L = w.shape
    n_valid = m.sum(dim=1, keepdim=True).to(torch.float64)  # (B, 1)
    s, order = torch.sort(torch.where(m, w, -1.0), dim=1, descending=True)  # (B, L); padding last
    s = s.clamp_min(0.0)
    k = torch.arange(L, dtype=torch.float64, device=w.device).expand(B, L)  # (B, L) candidate clip counts
    rest = s.flip(1).cumsum(1).flip(1)  # (B, L) sum of s[k:], i.e. everything not clipped
    budget = n_valid - k * w_max  # (B, L) mass left for the unclipped tokens
    c = budget / rest  # (B, L); inf/nan where rest == 0, handled by the zero-fill branch
    ok = ((rest > 0) & (c * s <= w_max * (1 + 1e-12))) | (rest <= 0)  # (B, L)
    ok &= k < n_valid
    k_star = torch.where(ok.any(1), ok.float().argmax(1), 0)[:, None]  # (B, 1) first feasible k
    c_star = c.gather(1, k_star)  # (B, 1)
    zero_fill = rest.gather(1, k_star) <= 0  # (B, 1) all unclipped tokens have weight 0
    fill = budget.gather(1, k_star) / (n_valid - k_star)  # (B, 1) even share of what is left
    unclipped = torch.where(zero_fill, fill, c_star * s)  # (B, L)
    out_sorted = torch.where(k < k_star, torch.full_like(s, w_max), unclipped).clamp(max=w_max)  # (B, L)
    out = torch.empty_like(out_sorted).scatter_(1, order, out_sorted)  # (B, L) back in token order
    return torch.where(m, out, 0.0)


def permutation_seeds(seed: int, step: int, ids: Tensor | np.ndarray, mask: Tensor | np.ndarray) -> Tensor:
    """One generator seed per row for `permute_weights` (SPEC 3 `permute`), from the run seed, the optimizer
    step and the row's content, so a row's permutation is the same on every process, after any shuffle of the
    batch and on a resumed run, and independent of the global torch RNG (sampling is left untouched).

    The seed of row `b` is the first 8 bytes of `blake2b` over the little-endian int64 array
    `[seed, step, *ids[b][mask[b]]]` (the row's valid token ids in order), shifted right by one bit (a
    non-negative int64). Two identical rows (the same completion of the same prompt) share a permutation.

    Args:
        seed: the run seed. step: the optimizer step (`TrainerState.global_step` when the loss runs: 0 for
            the first update).
        ids: `(B, L)` token ids of each row (the trainer passes prompt and completion ids side by side).
        mask: `(B, L)` which ids belong to the row (prompt and completion masks).

    Returns:
        `(B,)` int64 seeds.
    """
    ids, valid = _as_tensor(ids, "ids").long().cpu(), _as_tensor(mask, "mask").cpu() != 0
    if ids.shape != valid.shape:
        raise ValueError(f"mask: shape {tuple(valid.shape)} does not match ids {tuple(ids.shape)}")
    head = np.array([seed, step], dtype="<i8").tobytes()
    seeds = []
    for row, keep in zip(ids.numpy(), valid.numpy()):  # a hash per row, never per token
        digest = hashlib.blake2b(head + row[keep].astype("<i8").tobytes(), digest_size=8).digest()
        seeds.append(int.from_bytes(digest, "little") >> 1)
    return torch.tensor(seeds, dtype=torch.int64)


def permute_weights(weights: Tensor | np.ndarray, mask: Tensor | np.ndarray, seeds: Tensor | np.ndarray) -> Tensor:
    """Permute each row's weights uniformly at random over its valid tokens (SPEC 3 `permute`): the row keeps
    its multiset of weights (so its concentration) and loses which token held which weight.

    Row `b` draws `T_b` float64 keys from `torch.Generator().manual_seed(seeds[b])` (CPU), one per valid token in
    order; the valid positions sorted by key (argsort, stable) receive the weights of the valid positions in
    order. float64 keys make ties (which would favour the identity order) negligible, and the draw depends only
    on the seed and `T_b`, not on the padding. Padding stays 0.

    Args:
        weights: `(B, T)` normalized weights, finite and `>= 0` on valid tokens.
        mask: `(B, T)` validity mask.
        seeds: `(B,)` integer seeds in `[0, 2^63)` (see `permutation_seeds`).

    Returns:
        `(B, T)` float32 permuted weights (the same values exactly: float32 -> float64 -> float32 is lossless).
    """
    w, m = _prepare_weights(weights, mask)
    seeds = torch.as_tensor(seeds).reshape(-1)
    if len(seeds) != w.shape[0]:
        raise ValueError(f"seeds: expected one per row ({w.shape[0]}), got {len(seeds)}")
    counts = m.sum(dim=1).tolist()
    draws = [
        torch.rand(int(n), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
        for s, n in zip(seeds.tolist(), counts)
    ]
    keys = torch.full(w.shape, torch.inf, dtype=torch.float64)  # (B, T); padding sorts last
    keys[m.cpu()] = torch.cat(draws) if draws else torch.empty(0, dtype=torch.float64)  # row-major = row by row
    shuffled = torch.argsort(keys.to(w.device), dim=1, stable=True)  # (B, T) valid positions in random order
    slots = torch.argsort((~m).to(torch.int8), dim=1, stable=True)  # (B, T) valid positions in order
    out = torch.zeros_like(w).scatter_(1, slots, w.gather(1, shuffled))  # padding receives padding's 0
    return out.to(torch.float32)
