"""Tests for arca.credit.normalize: schemes, fallback, mixing and the exact clip, on random and hand-made batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arca.credit.normalize import SCHEMES, clip_weights, degenerate_rows, mix_uniform, normalize


@st.composite
def batches(draw, allow_zero_rows: bool = True):
    """Random `(B, L)` saliences with a ragged mask; some rows all-zero, some with heavy values."""
    b = draw(st.integers(1, 4))
    length = draw(st.integers(1, 12))
    values = st.one_of(st.just(0.0), st.floats(0.0, 1e4, allow_nan=False, allow_infinity=False))
    a = np.array(draw(st.lists(values, min_size=b * length, max_size=b * length))).reshape(b, length)
    lengths = draw(st.lists(st.integers(0 if allow_zero_rows else 1, length), min_size=b, max_size=b))
    mask = np.arange(length)[None, :] < np.array(lengths)[:, None]
    return torch.tensor(a), torch.tensor(mask)


def rank_reference(values: list[float]) -> list[float]:
    """Average ranks by the textbook loop (ties share the mean of their positions)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for p in range(i, j + 1):
            ranks[order[p]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def water_fill_reference(w: np.ndarray, w_max: float) -> np.ndarray:
    """Solve `sum min(w_max, c * w) = T` for `c` by bisection: the point iterated clip+renormalize reaches."""
    w = w.astype(np.float64)
    lo, hi = 0.0, len(w) * w_max / w[w > 0].min()
    for _ in range(200):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(w_max, c * w).sum() < len(w) else (lo, c)
    return np.minimum(w_max, hi * w)


@settings(max_examples=150, deadline=None)
@given(
    batch=batches(),
    scheme=st.sampled_from(SCHEMES),
    tau=st.floats(0.05, 20.0),
    mix=st.floats(0.0, 1.0),
    w_max=st.one_of(st.none(), st.floats(1.0, 6.0)),
)
def test_normalize_preserves_credit(batch, scheme, tau, mix, w_max):
    a, mask = batch
    w, fallback = normalize(a, mask, scheme, tau, mix=mix, w_max=w_max)
    n_valid = mask.sum(1).double()
    assert w.dtype == torch.float32 and w.shape == a.shape and fallback.shape == (a.shape[0],)
    assert torch.all(w >= 0)
    assert torch.all(w[~mask] == 0)
    torch.testing.assert_close(w.double().sum(1), n_valid, rtol=1e-5, atol=1e-5)
    if w_max is not None:
        assert float(w.max()) <= w_max + 1e-6
    # Degenerate rows are uniform after the scheme, and mixing/clipping keeps uniform rows uniform.
    assert torch.all(w[fallback] == mask[fallback].float())
    assert not torch.any(fallback & (n_valid == 0))


@settings(max_examples=100, deadline=None)
@given(batch=batches(allow_zero_rows=False))
def test_rank_matches_textbook_average_ranks(batch):
    a, mask = batch
    a = torch.round(a / 2500)  # few distinct values, so ties are common
    w, fallback = normalize(a, mask, "rank")
    for row in range(a.shape[0]):
        if fallback[row]:
            continue
        t = int(mask[row].sum())
        ranks = np.array(rank_reference(a[row, :t].tolist()))
        np.testing.assert_allclose(w[row, :t].numpy(), ranks * t / ranks.sum(), rtol=1e-6)


def test_rank_ties_by_hand():
    a = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    w, _ = normalize(a, torch.ones_like(a, dtype=torch.bool), "rank")
    # ranks 3.5, 1, 3.5, 2 (sum 10), scaled to sum 4
    torch.testing.assert_close(w, torch.tensor([[1.4, 0.4, 1.4, 0.8]]))


def test_mean_and_softmax_by_hand():
    a = torch.tensor([[1.0, 3.0, 0.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w, fallback = normalize(a, mask, "mean")
    torch.testing.assert_close(w, torch.tensor([[0.75, 2.25, 0.0, 0.0]]))
    assert not fallback.any()
    w, _ = normalize(a, mask, "softmax", tau=2.0)
    expected = 3 * torch.softmax(torch.tensor([0.5, 1.5, 0.0]), 0)
    torch.testing.assert_close(w[0, :3], expected)
    assert w[0, 3] == 0


def test_sharpening_is_the_papers_square_then_sum_to_t():
    a = torch.tensor([[1.0, 3.0, 0.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w, fallback = normalize(a, mask, "mean", eps=1e-8, sharpening=2.0)
    sq = (torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64) + 1e-8) ** 2  # the paper: (a + 1e-8)^2 / sum
    torch.testing.assert_close(w[0, :3], (3 * sq / sq.sum()).float())
    assert w[0, 3] == 0 and not fallback.any()
    zero, fallback = normalize(torch.zeros(1, 3), torch.ones(1, 3), sharpening=0.5)  # exact 0 falls back for any p
    assert fallback.all() and (zero == 1).all()


def paper_masked_normalize(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ARCA paper's weights (PAPER.md "weights", `token_weights.masked_normalize` at d34239a), re-typed:
    `(a + 1e-8)^2` on valid tokens, summing to 1; uniform when the sharpened sum is <= 1e-8."""
    sharpened = (scores.double() + 1e-8) ** 2 * mask
    total = sharpened.sum(-1, keepdim=True)
    uniform = mask / mask.sum(-1, keepdim=True)
    return torch.where(total <= 1e-8, uniform, sharpened / total.clamp_min(1e-30))


# T = 4, eps = 1e-8: raw masses 0, 1e-6 (between eps * T = 4e-8 and ~sqrt(eps) = 1e-4) and 1 (normal).
TINY_ROWS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e-6, 0.0, 0.0, 0.0], [0.4, 0.1, 0.3, 0.2]], dtype=torch.float64)


def test_sharpened_sum_drops_tiny_saliences_that_raw_mean_keeps():
    mask = torch.ones_like(TINY_ROWS, dtype=torch.bool)
    raw_w, raw_fb = normalize(TINY_ROWS, mask, sharpening=2.0)
    sharp_w, sharp_fb = normalize(TINY_ROWS, mask, sharpening=2.0, fallback="sharpened_sum")
    assert raw_fb.tolist() == [True, False, False]  # the row of exact zeros falls back under both rules
    assert sharp_fb.tolist() == [True, True, False]  # ... the tiny row only under the paper's
    assert raw_w[1].max() > 3.9 and torch.equal(sharp_w[1], torch.ones(4))  # 1e-6 ~ 1e-6 + 1e-8 dominates its row
    torch.testing.assert_close(raw_w[2], sharp_w[2], rtol=0, atol=0)
    for rule, expected in (("raw_mean", raw_fb), ("sharpened_sum", sharp_fb)):
        assert torch.equal(degenerate_rows(TINY_ROWS, mask, fallback=rule, sharpening=2.0), expected)
    # p = 1: the scores are the raw saliences, tested against eps itself (not eps * T): mass 2e-8 falls back
    # under raw_mean (<= 4e-8) and not under sharpened_sum (> 1e-8).
    row, ones = torch.full((1, 4), 5e-9), torch.ones(1, 4)
    assert degenerate_rows(row, ones).tolist() == [True]
    assert degenerate_rows(row, ones, fallback="sharpened_sum").tolist() == [False]
    with pytest.raises(ValueError, match=r"^fallback: unknown rule 'mean'"):
        normalize(TINY_ROWS, mask, fallback="mean")


def test_sharpened_sum_is_the_papers_masked_normalize():
    torch.manual_seed(0)
    scale = torch.tensor([[1.0], [1e-3], [1e-5], [1e-7], [0.0]], dtype=torch.float64)
    scores = torch.rand(5, 6, dtype=torch.float64) * scale  # (5, 6): rows from ordinary to degenerate
    mask = torch.ones(5, 6)
    mask[1, 4:] = 0
    ours, fallback = normalize(scores, mask, "mean", eps=1e-8, sharpening=2.0, fallback="sharpened_sum")
    lengths = mask.sum(-1, keepdim=True)
    torch.testing.assert_close(ours.double() / lengths, paper_masked_normalize(scores, mask), rtol=1e-6, atol=1e-9)
    assert fallback.tolist() == [False, False, True, True, True]  # raw_mean would keep rows 2 and 3


def test_softmax_temperature_limits():
    a = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    mask = torch.ones_like(a, dtype=torch.bool)
    hot, _ = normalize(a, mask, "softmax", tau=1e6)
    torch.testing.assert_close(hot, torch.ones_like(a), atol=1e-4, rtol=0)
    cold, _ = normalize(a, mask, "softmax", tau=1e-3)
    torch.testing.assert_close(cold, torch.tensor([[0.0, 0.0, 4.0, 0.0]]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_degenerate_rows_fall_back(scheme):
    nan, inf = math.nan, math.inf
    a = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # all zero (ARCA at step 0)
            [1.0, nan, 2.0, 0.0],  # NaN on a valid token
            [1.0, inf, 2.0, 0.0],  # inf on a valid token
            [1e-12, 0.0, 0.0, 0.0],  # below eps * T
            [1.0, 2.0, nan, inf],  # non-finite only on padding: not degenerate
            [5.0, 5.0, 5.0, 5.0],  # no valid token
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    expected = torch.tensor([True, True, True, True, False, False])
    assert torch.equal(degenerate_rows(a, mask), expected)
    w, fallback = normalize(a, mask, scheme)
    assert torch.equal(fallback, expected)
    torch.testing.assert_close(w[:4], mask[:4].float())
    assert torch.isfinite(w).all()
    assert torch.all(w[5] == 0)
    torch.testing.assert_close(w[4].sum(), torch.tensor(2.0))


def test_numpy_input_and_int_mask():
    a = np.array([[1.0, 3.0]], dtype=np.float32)
    w, fallback = normalize(a, np.array([[1, 1]]))
    assert isinstance(w, torch.Tensor)
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5]]))
    assert fallback.dtype == torch.bool


def test_mix_uniform_endpoints_and_midpoint():
    w = torch.tensor([[4.0, 0.0, 0.0, 0.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    torch.testing.assert_close(mix_uniform(w, mask, 0.0), torch.tensor([[1.0, 1, 1, 1, 0]]))
    torch.testing.assert_close(mix_uniform(w, mask, 1.0), torch.tensor([[4.0, 0, 0, 0, 0]]))
    torch.testing.assert_close(mix_uniform(w, mask, 0.25), torch.tensor([[1.75, 0.75, 0.75, 0.75, 0]]))
    # normalize applies the same mix after the scheme
    got, _ = normalize(torch.tensor([[8.0, 0, 0, 0, 1]]), mask, "mean", mix=0.25)
    torch.testing.assert_close(got, torch.tensor([[1.75, 0.75, 0.75, 0.75, 0]]))


@settings(max_examples=100, deadline=None)
@given(batch=batches(allow_zero_rows=False), w_max=st.floats(1.0, 4.0))
def test_clip_matches_water_filling_and_respects_cap(batch, w_max):
    a, mask = batch
    a = a + 1e-3 * mask  # strictly positive weights, so a multiplicative solution exists
    w, _ = normalize(a, mask, "mean")
    clipped = clip_weights(w, mask, w_max)
    for row in range(a.shape[0]):
        t = int(mask[row].sum())
        got = clipped[row, :t].double().numpy()
        assert got.max() <= w_max + 1e-6
        assert abs(got.sum() - t) <= 1e-5 * t
        np.testing.assert_allclose(got, water_fill_reference(w[row, :t].numpy(), w_max), rtol=1e-4, atol=1e-4)


def test_clip_by_hand_needs_more_than_one_pass():
    w = torch.tensor([[10.0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])  # one clip + rescale would still exceed the cap
    got = clip_weights(w / w.mean(), torch.ones_like(w), 1.5)
    torch.testing.assert_close(got, torch.tensor([[1.5] + [8.5 / 9] * 9]))


def test_clip_spreads_remainder_over_zero_weights():
    w = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = clip_weights(w, torch.ones_like(w), 2.0)
    # the one positive token is capped at 2; the other 2 units go evenly to the zero-weight tokens
    torch.testing.assert_close(got, torch.tensor([[2.0, 2 / 3, 2 / 3, 2 / 3], [1.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(clip_weights(w[:1], torch.ones(1, 4), 1.0), torch.ones(1, 4))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"saliences": torch.ones(2, 3), "mask": torch.ones(2, 4)}, "mask"),
        ({"saliences": torch.ones(3), "mask": torch.ones(3)}, "saliences"),
        ({"saliences": torch.tensor([[1.0, -0.5]]), "mask": torch.ones(1, 2)}, "saliences"),
        ({"scheme": "max"}, "scheme"),
        ({"tau": 0.0}, "tau"),
        ({"mix": 1.5}, "mix"),
        ({"mix": -0.1}, "mix"),
        ({"w_max": 0.9}, "w_max"),
        ({"sharpening": 0.0}, "sharpening"),
        ({"sharpening": float("inf")}, "sharpening"),
    ],
)
def test_normalize_rejects_bad_input(kwargs, name):
    args = {"saliences": torch.ones(2, 3), "mask": torch.ones(2, 3), **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}:"):
        normalize(**args)


def test_negative_salience_on_padding_is_ignored():
    w, _ = normalize(torch.tensor([[1.0, -3.0]]), torch.tensor([[1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0]]))


def test_helpers_reject_bad_input():
    with pytest.raises(ValueError, match=r"^lam:"):
        mix_uniform(torch.ones(1, 2), torch.ones(1, 2), 2.0)
    with pytest.raises(ValueError, match=r"^w_max:"):
        clip_weights(torch.ones(1, 2), torch.ones(1, 2), 0.5)
    with pytest.raises(ValueError, match=r"^weights:"):
        clip_weights(torch.tensor([[1.0, math.nan]]), torch.ones(1, 2), 2.0)
    with pytest.raises(ValueError, match=r"^mask:"):
        degenerate_rows(torch.ones(1, 2), torch.ones(1, 3))
