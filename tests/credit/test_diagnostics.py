"""Tests for arca.credit.diagnostics: metric properties, the flat-table path against the padded one, aggregates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arca.analysis.agnostic import agnostic_tokens
from arca.credit import diagnostics
from arca.credit.diagnostics import (
    aggregate,
    agnostic_share,
    effective_token_ratio,
    gini,
    regime,
    top_k_mass,
    trajectory_diagnostics,
)

# Zero or normal-sized weights: squares of values below ~1e-154 underflow (documented in the module).
weight = st.one_of(st.just(0.0), st.floats(1e-100, 1e3))
rows = st.lists(weight, min_size=1, max_size=30)


def one_row(values) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(values, dtype=np.float64)[None, :]
    return w, np.ones_like(w, dtype=bool)


def gini_mean_abs_difference(w: np.ndarray) -> float:
    """Textbook Gini `sum_ij |w_i - w_j| / (2 T sum w)`, independent of the sorted formula."""
    return float(np.abs(w[:, None] - w[None, :]).sum() / (2 * len(w) * w.sum())) if w.sum() > 0 else 0.0


@settings(max_examples=200, deadline=None)
@given(values=rows, seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3))
def test_gini_and_etr_ranges_and_invariances(values, seed, scale):
    w, m = one_row(values)
    t = w.shape[1]
    g, e = gini(w, m)[0], effective_token_ratio(w, m)[0]
    assert 0.0 <= g <= 1 - 1 / t
    assert 1 / t <= e <= 1.0
    assert g == pytest.approx(gini_mean_abs_difference(w[0]), abs=1e-9)
    shuffled = w[:, np.random.default_rng(seed).permutation(t)]
    assert gini(shuffled, m)[0] == pytest.approx(g, abs=1e-12)
    assert effective_token_ratio(shuffled, m)[0] == pytest.approx(e, abs=1e-12)
    assert gini(w * scale, m)[0] == pytest.approx(g, abs=1e-9)
    assert effective_token_ratio(w * scale, m)[0] == pytest.approx(e, abs=1e-9)


@pytest.mark.parametrize("t", [1, 2, 7, 100])
def test_uniform_and_one_hot_extremes(t):
    w, m = one_row(np.ones(t))
    assert gini(w, m)[0] == pytest.approx(0.0, abs=1e-12)
    assert effective_token_ratio(w, m)[0] == pytest.approx(1.0)
    hot = np.zeros((1, t))
    hot[0, t // 2] = 3.0
    assert gini(hot, m)[0] == pytest.approx(1 - 1 / t)
    assert effective_token_ratio(hot, m)[0] == pytest.approx(1 / t)
    assert top_k_mass(hot, m)[0] == pytest.approx(1.0)


def test_zero_weights_read_as_uniform_and_empty_rows():
    w = np.zeros((2, 4))
    m = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    agn = np.array([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(gini(w, m), [0.0, 0.0])
    np.testing.assert_array_equal(effective_token_ratio(w, m), [1.0, 1.0])
    np.testing.assert_array_equal(top_k_mass(w, m), [0.25, 0.0])
    np.testing.assert_array_equal(agnostic_share(w, m, agn), [0.25, 0.0])


def test_padding_is_ignored_and_torch_accepted():
    w = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, -5.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    np.testing.assert_allclose(gini(w, m), [2 * (1 + 6) / (2 * 4) - 1.5, 0.0])
    np.testing.assert_allclose(effective_token_ratio(w, m), [16 / (2 * 10), 1.0])


@pytest.mark.parametrize(("t", "k"), [(1, 1), (20, 1), (21, 2), (60, 3), (100, 5), (101, 6)])
def test_top_k_mass_uses_ceil_of_five_percent(t, k):
    w = np.arange(1, t + 1, dtype=np.float64)[None, :]
    m = np.ones_like(w, dtype=bool)
    top = np.sort(w[0])[-k:].sum() / w.sum()
    assert top_k_mass(w, m)[0] == pytest.approx(top)


def test_agnostic_share_by_hand():
    w = np.array([[1.0, 2.0, 3.0, 4.0]])
    m = np.array([[1, 1, 1, 0]], dtype=bool)
    agn = np.array([[1, 0, 1, 1]], dtype=bool)  # the last flag sits on padding
    assert agnostic_share(w, m, agn)[0] == pytest.approx(4 / 6)


def test_regime_thresholds():
    got = regime(np.array([1.0, 0.95, 0.9499, 0.5, 0.25, 0.1]))
    assert list(got) == ["uniform", "uniform", "middle", "middle", "concentrated", "concentrated"]
    assert list(regime(np.array([0.5]), etr_uniform=0.5, etr_concentrated=0.1)) == ["uniform"]
    with pytest.raises(ValueError, match=r"^etr_concentrated:"):
        regime(np.array([0.5]), etr_uniform=0.2, etr_concentrated=0.3)


def test_agnostic_tokens():
    tokens = [" ", "\n\n", ".", "),", " The", "the", "$", "\\boxed", "x", " 42", "+", "", "<|im_end|>", "We"]
    formatting = ["the", "$", "\\boxed", "<|im_end|>", " we "]
    got = agnostic_tokens(tokens, formatting)
    expected = [True, True, True, True, True, True, True, True, False, False, False, True, True, True]
    assert got.tolist() == expected
    assert agnostic_tokens([], formatting).shape == (0,)


def padded(traj, values, flags, ids):
    """Padded (B, T) batch from a flat table, one row per id in `ids`."""
    groups = [np.flatnonzero(traj == i) for i in ids]
    length = max(len(g) for g in groups)
    w = np.zeros((len(ids), length), dtype=values.dtype)
    a = np.zeros((len(ids), length), dtype=bool)
    m = np.arange(length)[None, :] < np.array([len(g) for g in groups])[:, None]
    w[m] = np.concatenate([values[g] for g in groups])
    a[m] = np.concatenate([flags[g] for g in groups])
    return w, m, a


def random_table(rng, n_traj, max_len, dtype=np.float32):
    lengths = rng.integers(1, max_len + 1, n_traj)
    ids = rng.choice(10 * n_traj, n_traj, replace=False) - 3 * n_traj  # sparse, some negative
    traj = np.repeat(ids, lengths)
    w = rng.pareto(1.2, len(traj)) * (rng.random(len(traj)) < 0.8)  # heavy tail and exact zeros
    w[np.repeat(rng.random(n_traj) < 0.1, lengths)] = 0.0  # some all-zero trajectories
    w[rng.random(len(traj)) < 0.05] = 7.0  # exact ties
    return traj, w.astype(dtype), rng.random(len(traj)) < 0.3


@pytest.mark.parametrize("layout", ["contiguous", "contiguous_unsorted_ids", "interleaved"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk_tokens", [1 << 18, 2000])
def test_flat_table_matches_padded_functions(layout, dtype, chunk_tokens, monkeypatch):
    monkeypatch.setattr(diagnostics, "_CHUNK_TOKENS", chunk_tokens)  # 2000: many chunks, one per few trajs
    rng = np.random.default_rng(7)
    traj, w, agn = random_table(rng, n_traj=120, max_len=700, dtype=dtype)  # widths from 16 to 704
    if layout == "contiguous":
        order = np.argsort(traj, kind="stable")
    elif layout == "contiguous_unsorted_ids":
        order = np.arange(len(traj))
    else:
        order = rng.permutation(len(traj))
    traj, w, agn = traj[order], w[order], agn[order]
    got = trajectory_diagnostics(traj, w, agn)
    ids = np.unique(traj)
    np.testing.assert_array_equal(got["traj"], ids)
    pw, pm, pa = padded(traj, w, agn, ids)
    np.testing.assert_array_equal(got["T"], pm.sum(1))
    np.testing.assert_allclose(got["gini"], gini(pw, pm), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["etr"], effective_token_ratio(pw, pm), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["top_k_mass"], top_k_mass(pw, pm), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["agnostic_share"], agnostic_share(pw, pm, pa), rtol=1e-10, atol=1e-12)
    assert list(got["regime"]) == list(regime(effective_token_ratio(pw, pm)))
    assert list(got.columns) == ["traj", "T", "gini", "etr", "top_k_mass", "agnostic_share", "regime"]


@pytest.mark.parametrize("spread", [1, 2**20, 2**40, 2**62])
def test_interleaved_table_with_wide_ids_matches_grouped(spread):
    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(-spread, spread, 300, dtype=np.int64))
    lengths = rng.integers(1, 60, len(ids))
    traj = np.repeat(ids, lengths)
    w = rng.exponential(size=len(traj))
    grouped = trajectory_diagnostics(traj, w)
    order = rng.permutation(len(traj))
    pd.testing.assert_frame_equal(trajectory_diagnostics(traj[order], w[order]), grouped, rtol=1e-12)


def test_flat_table_long_trajectory_and_options():
    rng = np.random.default_rng(1)
    lengths = np.array([1, 15, 16, 17, 513, 5000])
    traj = np.repeat(np.arange(len(lengths)), lengths)
    w = rng.exponential(size=len(traj))
    got = trajectory_diagnostics(traj, w, top_frac=0.2, etr_uniform=0.9, etr_concentrated=0.5)
    pw, pm, _ = padded(traj, w, np.zeros(len(traj), bool), np.arange(len(lengths)))
    np.testing.assert_allclose(got["gini"], gini(pw, pm), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["top_k_mass"], top_k_mass(pw, pm, frac=0.2), rtol=1e-10, atol=1e-12)
    etr = effective_token_ratio(pw, pm)
    assert list(got["regime"]) == list(regime(etr, etr_uniform=0.9, etr_concentrated=0.5))
    assert got["agnostic_share"].isna().all()


def test_flat_table_edge_cases():
    empty = trajectory_diagnostics(np.zeros(0, dtype=np.int64), np.zeros(0))
    assert len(empty) == 0 and "regime" in empty.columns
    got = trajectory_diagnostics(np.array([5, 5]), np.array([-0.0, 0.0]), np.array([True, False]))
    assert got.loc[0, "etr"] == 1.0 and got.loc[0, "agnostic_share"] == 0.5


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((np.array([0.5, 1.5]), np.ones(2)), {}, "traj"),
        ((np.zeros(3, dtype=int), np.ones(2)), {}, "weights"),
        ((np.zeros(2, dtype=int), np.array([1.0, np.nan])), {}, "weights"),
        ((np.zeros(2, dtype=int), np.array([1.0, -1.0])), {}, "weights"),
        ((np.zeros(2, dtype=int), np.ones(2), np.ones(3, bool)), {}, "agnostic"),
        ((np.zeros(2, dtype=int), np.ones(2)), {"top_frac": 0.0}, "frac"),
        ((np.zeros(2, dtype=int), np.ones(2)), {"etr_uniform": 0.1}, "etr_concentrated"),
    ],
)
def test_flat_table_rejects_bad_input(args, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        trajectory_diagnostics(*args, **kwargs)


def test_padded_functions_reject_bad_input():
    with pytest.raises(ValueError, match=r"^mask:"):
        gini(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"^weights:"):
        effective_token_ratio(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match=r"^agnostic:"):
        agnostic_share(np.ones((1, 3)), np.ones((1, 3)), np.ones((1, 2)))


def test_aggregate_by_group():
    per = pd.DataFrame(
        {
            "signal": ["a"] * 4 + ["b"] * 2,
            "step": [0, 0, 0, 0, 10, 10],
            "gini": [0.0, 0.1, 0.2, 0.9, 0.5, 0.7],
            "etr": [1.0, 0.96, 0.5, 0.1, 0.2, 0.1],
            "top_k_mass": [0.05, 0.1, 0.2, 0.8, 0.3, 0.4],
            "agnostic_share": [0.1, np.nan, 0.3, 0.5, 0.2, 0.2],
        }
    )
    per["regime"] = regime(per["etr"].to_numpy())
    got = aggregate(per, by=["signal", "step"])
    assert list(got["signal"]) == ["a", "b"] and list(got["n"]) == [4, 2]
    a = got.iloc[0]
    assert a["gini_mean"] == pytest.approx(0.3) and a["gini_median"] == pytest.approx(0.15)
    assert a["gini_p10"] == pytest.approx(np.quantile([0.0, 0.1, 0.2, 0.9], 0.1))
    assert a["gini_p90"] == pytest.approx(np.quantile([0.0, 0.1, 0.2, 0.9], 0.9))
    assert a["agnostic_share_mean"] == pytest.approx(0.3)  # NaN skipped
    assert (a["frac_uniform"], a["frac_middle"], a["frac_concentrated"]) == (0.5, 0.25, 0.25)
    assert got.iloc[1]["frac_concentrated"] == 1.0
    overall = aggregate(per, by=[], metrics=["gini"])
    assert len(overall) == 1 and overall.loc[0, "n"] == 6 and "etr_mean" not in overall.columns
    with pytest.raises(ValueError, match=r"^by:"):
        aggregate(per, by=["run"])
    with pytest.raises(ValueError, match=r"^metrics:"):
        aggregate(per, by=["signal"], metrics=["entropy"])
