"""Uncertainty of held-out accuracies (SPEC 7): 95% Wilson intervals over problems, the spread over seeds, and
a seeded paired bootstrap for the difference between two methods on the same problems.

Every score here is per problem and lies in [0, 1]: 0/1 for pass@1 (greedy) and pass@k, the share of correct
samples for mean@k. Problems are the unit of analysis throughout: the k samples of one problem are not
independent draws (an easy problem is easy for all of them), so neither n*k Bernoulli trials nor a Wilson
interval on the mean of per-problem means with n = problems is right for mean@k. `clustered_wilson_interval`
uses the Wilson interval at the effective sample size of the clustered samples (Kish's design effect; Korn &
Graubard 1998 use the same effective size in the Clopper-Pearson interval): n_eff = p(1 - p) / Var(p), with
Var(p) the variance of the per-problem means over problems divided by their count, clipped to
[problems, problems * k] (k samples of one problem carry at least one problem's and at most k independent
samples' worth). With k = 1 it is the Wilson interval; unlike a t-interval or a bootstrap it keeps a width
when every problem scores the same (0/16 correct), where a bootstrap says [0, 0].

Left out: intervals for pass@k's unbiased estimator with n > k samples (we draw exactly k), and multiple-
comparison corrections across methods (the table reports each method against `uniform` on its own).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

LEVEL = 0.95
Z95 = NormalDist().inv_cdf(0.5 + LEVEL / 2)  # 1.959963984540054
BOOTSTRAP_SAMPLES = 10_000


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n`; `n` may be an effective (non-integer) size.

    Args:
        successes: correct count (or p * n for an effective size), 0 <= successes <= n.
        n: trials (> 0).
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, center - half)), float(min(1.0, center + half))


def effective_sample_size(per_problem: np.ndarray, samples: int) -> float:
    """Independent-sample equivalent of `per_problem` means of `samples` 0/1 draws each (Kish: n*k / deff),
    clipped to [problems, problems * samples]; `problems` when every problem has the same score, since then
    the within-problem correlation cannot be estimated and the cautious bound applies.

    Args:
        per_problem: (P,) mean score of each problem, in [0, 1].
        samples: draws behind each mean (k, or k * seeds).
    """
    scores = _scores(per_problem, "effective_sample_size")
    n, p = len(scores), float(scores.mean())
    var_mean = float(scores.var(ddof=1)) / n if n > 1 else 0.0  # Var(p): cluster-robust, over problems
    if var_mean <= 0 or p in (0.0, 1.0):
        return float(n)
    return float(np.clip(p * (1 - p) / var_mean, n, n * max(samples, 1)))


def clustered_wilson_interval(per_problem: np.ndarray, samples: int, z: float = Z95) -> tuple[float, float]:
    """Wilson interval of the mean of per-problem scores at their effective sample size (module docstring).
    For 0/1 scores with `samples` = 1 (pass@1, pass@k) it equals `wilson_interval(sum, problems)`.

    Args:
        per_problem: (P,) mean score of each problem, in [0, 1].
        samples: draws behind each problem's score (1 for pass@1; k for mean@k; times the seeds when the
            scores are averaged over seeds).
    """
    scores = _scores(per_problem, "clustered_wilson_interval")
    n_eff = effective_sample_size(scores, samples)
    return wilson_interval(float(scores.mean()) * n_eff, n_eff, z)


def mean_sd(values: np.ndarray) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1) of per-seed accuracies; sd is None for fewer than two
    seeds (one seed has no spread to report: show its interval instead)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("mean_sd: no values")
    return float(values.mean()), (float(values.std(ddof=1)) if values.size >= 2 else None)


def paired_bootstrap_interval(
    differences: np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem paired differences (method - baseline on the
    same problems), resampling problems with replacement from a generator seeded with `seed`, so the same
    inputs give the same interval. Identical scores on every problem give [0, 0]: read it as "no problem
    scored differently", not as certainty.

    Args:
        differences: (P,) per-problem score differences, in [-1, 1].
        samples: bootstrap resamples.
    """
    diffs = np.asarray(differences, dtype=float)
    if diffs.ndim != 1 or diffs.size == 0 or not np.isfinite(diffs).all():
        raise ValueError("paired_bootstrap_interval: differences must be a non-empty 1-d array of finite numbers")
    rng = np.random.default_rng(seed)
    # Resampling P problems with replacement only decides how often each distinct difference is drawn, so
    # draw those counts directly: the same distribution, without a (B, P) index (differences of 0/1 scores
    # take at most 3 values, of mean@k at most 2k + 1).
    values, counts = np.unique(diffs, return_counts=True)  # (U,), (U,)
    draws = rng.multinomial(diffs.size, counts / diffs.size, size=samples)  # (B, U)
    means = (draws * values).sum(axis=1) / diffs.size  # (B,); no BLAS: same bytes with any thread count
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def _scores(per_problem: np.ndarray, where: str) -> np.ndarray:
    scores = np.asarray(per_problem, dtype=float)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"{where}: per_problem must be a non-empty 1-d array")
    if not ((scores >= 0) & (scores <= 1)).all():
        raise ValueError(f"{where}: per-problem scores must lie in [0, 1]")
    return scores
