"""arca.analysis.stats against values computed by hand from the closed forms (Wilson score interval, Kish effective
sample size) and against the normal approximation for the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arca.analysis.stats import (
    Z95,
    clustered_wilson_interval,
    effective_sample_size,
    mean_sd,
    paired_bootstrap_interval,
    wilson_interval,
)

Z2 = 1.959963984540054**2  # 3.8414588...


def _close(got: tuple[float, float], want: tuple[float, float], tol: float = 1e-9) -> bool:
    return all(math.isclose(g, w, abs_tol=tol) for g, w in zip(got, want))


def test_z_is_the_two_sided_95_quantile():
    assert math.isclose(Z95, 1.959963984540054, rel_tol=1e-12)


def test_wilson_interval_by_hand():
    # 9/24: p = 0.375; center = (0.375 + z²/48) / (1 + z²/24) = 0.392247;
    # half = z / (1 + z²/24) * sqrt(0.375 * 0.625 / 24 + z² / (4 * 24²)) = 0.180653
    assert _close(wilson_interval(9, 24), (0.2115937, 0.5729004), tol=1e-6)
    # no success: [0, z² / (n + z²)]; all successes: [n / (n + z²), 1]
    assert _close(wilson_interval(0, 16), (0.0, Z2 / (16 + Z2)))
    assert _close(wilson_interval(16, 16), (16 / (16 + Z2), 1.0))
    # symmetric around 1/2
    low, high = wilson_interval(2, 4)
    assert math.isclose(low + high, 1.0) and _close((low, high), (0.1500390, 0.8499610), tol=1e-6)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n must be > 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_effective_sample_size_by_hand():
    # means (1, .5, .5, 0) of k = 2: p = .5, sample var = 0.5 / 3, Var(p) = 1/24, n_eff = .25 * 24 = 6 in [4, 8]
    assert math.isclose(effective_sample_size(np.array([1.0, 0.5, 0.5, 0.0]), 2), 6.0)
    # (.25, .75, .25, .75): sample var = 1/12, Var(p) = 1/48, n_eff = 12: kept for k = 4, clipped to n*k = 8 for k = 2
    scores = np.array([0.25, 0.75, 0.25, 0.75])
    assert math.isclose(effective_sample_size(scores, 4), 12.0)
    assert math.isclose(effective_sample_size(scores, 2), 8.0)
    # whole problems right or wrong (k samples agree): Var(p) = (1/3) / 4, n_eff = 3, clipped up to n = 4
    assert effective_sample_size(np.array([1.0, 1.0, 0.0, 0.0]), 2) == 4.0
    # no spread to estimate the correlation from: the cautious bound, one draw per problem
    assert effective_sample_size(np.zeros(16), 2) == 16.0
    assert effective_sample_size(np.full(5, 0.5), 4) == 5.0


def test_clustered_wilson_interval_by_hand():
    assert _close(clustered_wilson_interval(np.array([1.0, 0.5, 0.5, 0.0]), 2), wilson_interval(3, 6))
    assert _close(clustered_wilson_interval(np.array([1.0, 1.0, 0.0, 0.0]), 2), wilson_interval(2, 4))
    # 0/16 correct: a real width, not [0, 0]
    assert _close(clustered_wilson_interval(np.zeros(16), 2), (0.0, Z2 / (16 + Z2)))
    # 0/1 scores with one draw each (pass@1): exactly the Wilson interval over problems
    greedy = np.array([1.0] * 9 + [0.0] * 15)
    assert _close(clustered_wilson_interval(greedy, 1), wilson_interval(9, 24))


def test_clustered_wilson_interval_checks_its_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clustered_wilson_interval(np.array([0.5, 1.5]), 2)
    with pytest.raises(ValueError, match="non-empty"):
        clustered_wilson_interval(np.array([]), 2)


def test_mean_sd_reports_no_spread_for_one_seed():
    mean, sd = mean_sd(np.array([0.25, 0.75]))
    assert mean == 0.5 and math.isclose(sd, math.sqrt(0.125))  # sample sd: sqrt(2 * 0.25² / 1)
    assert mean_sd(np.array([0.4])) == (0.4, None)


def test_paired_bootstrap_interval_is_seeded_and_matches_the_normal_approximation():
    diffs = np.r_[np.zeros(200), np.ones(200)]  # mean 0.5, se = 0.5 / sqrt(400) = 0.025
    low, high = paired_bootstrap_interval(diffs, seed=0)
    assert abs(low - (0.5 - 1.96 * 0.025)) < 0.01 and abs(high - (0.5 + 1.96 * 0.025)) < 0.01
    assert paired_bootstrap_interval(diffs, seed=0) == (low, high)  # byte-deterministic tables
    spread = np.linspace(-1.0, 1.0, 41)
    assert paired_bootstrap_interval(spread, seed=1) != paired_bootstrap_interval(spread, seed=0)


def test_paired_bootstrap_interval_degenerate_cases():
    assert paired_bootstrap_interval(np.zeros(24)) == (0.0, 0.0)  # no problem scored differently
    assert paired_bootstrap_interval(np.full(3, 0.25)) == (0.25, 0.25)
    low, high = paired_bootstrap_interval(np.array([1.0, 1.0, 1.0, 0.0]))
    assert 0.0 <= low <= 0.75 <= high <= 1.0
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap_interval(np.array([]))
