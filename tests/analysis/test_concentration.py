import math

import numpy as np
import pandas as pd
import pytest
import torch

from arca.analysis.concentration import (
    NOISE_COLUMNS,
    noise_table,
    phase_of,
    signal_agreement,
    trajectory_table,
    within_spearman,
)
from arca.credit.config import CreditConfig
from arca.credit.diagnostics import effective_token_ratio, gini
from arca.credit.normalize import normalize
from arca.credit.precision import noise_share, rank_correlation

SIGNALS = ["uniform", "kl", "arca"]


def _dumps() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for step in (0, 2, 4):
        for prompt in ("p1", "p2"):
            for sample in range(2):
                t = int(rng.integers(3, 9))
                kl = rng.exponential(size=t)
                arca = np.zeros(t) if step == 0 else rng.exponential(size=t)
                for pos in range(t):
                    rows.append(
                        {
                            "run": "arca-r8-s0",
                            "method": "arca",
                            "rank": 8,
                            "seed": 0,
                            "step": step,
                            "prompt_id": prompt,
                            "sample": sample,
                            "pos": pos,
                            "token": ["$", "7", " the"][pos % 3],
                            "a_uniform": 1.0,
                            "w_uniform": 1.0,
                            "a_kl": kl[pos],
                            "w_kl": kl[pos] / kl.mean(),
                            "a_arca": arca[pos],
                            "w_arca": 1.0 if step == 0 else arca[pos] / arca.mean(),
                        }
                    )
    return pd.DataFrame(rows).sample(frac=1.0, random_state=1)  # row order must not matter


def test_trajectory_table_matches_batch_functions():
    dumps = _dumps()
    traj = trajectory_table(dumps, SIGNALS, ["the", "$"])
    assert len(traj) == 3 * 2 * 2 * len(SIGNALS) * 2
    one = dumps[(dumps.step == 2) & (dumps.prompt_id == "p1") & (dumps["sample"] == 1)].sort_values("pos")
    row = traj[
        (traj.step == 2)
        & (traj.prompt_id == "p1")
        & (traj["sample"] == 1)
        & (traj.signal == "kl")
        & (traj.over == "weight")
    ].iloc[0]
    w = one["w_kl"].to_numpy()[None, :]
    m = np.ones_like(w)
    np.testing.assert_allclose(row["gini"], gini(w, m)[0], rtol=1e-9)
    np.testing.assert_allclose(row["etr"], effective_token_ratio(w, m)[0], rtol=1e-9)
    agnostic = one["token"].isin(["$", " the"]).to_numpy()
    np.testing.assert_allclose(row["agnostic_share"], w[0, agnostic].sum() / w.sum(), rtol=1e-9)


def test_fallback_and_phase():
    traj = trajectory_table(_dumps(), SIGNALS, [])
    arca = traj[(traj.signal == "arca") & (traj.over == "weight")]
    assert arca[arca.step == 0]["fallback"].all()
    assert not arca[arca.step > 0]["fallback"].any()
    assert set(arca[arca.step == 0]["phase"]) == {"init"}
    assert set(arca[arca.step == 4]["phase"]) == {"final"}
    assert set(arca[arca.step == 2]["phase"]) == {"mid"}
    uniform = traj[(traj.signal == "uniform") & (traj.over == "weight")]
    assert (uniform["gini"].abs() < 1e-12).all() and (uniform["regime"] == "uniform").all()


def test_phase_of():
    assert list(phase_of(pd.Series([0, 3, 6]))) == ["init", "mid", "final"]


def test_signal_agreement_is_one_for_identical_rankings():
    dumps = _dumps()
    dumps["w_arca"] = dumps["w_kl"] * 3.0  # same ranking, different scale
    agree = signal_agreement(dumps, SIGNALS)
    row = agree[(agree.signal_a == "kl") & (agree.signal_b == "arca")]
    np.testing.assert_allclose(row["spearman_mean"].to_numpy(), 1.0)
    dumps["w_arca"] = -dumps["w_kl"]
    agree = signal_agreement(dumps, SIGNALS)
    row = agree[(agree.signal_a == "kl") & (agree.signal_b == "arca")]
    np.testing.assert_allclose(row["spearman_mean"].to_numpy(), -1.0)
    assert "uniform" not in set(agree.signal_a) | set(agree.signal_b)


def _noise_dumps() -> pd.DataFrame:
    """A bf16 run with a32 columns (ties, 1-token and all-zero trajectories included) and a float32 run without."""
    rng = np.random.default_rng(3)
    frames = []
    for step in (0, 2, 4):
        for prompt, sample in [("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)]:
            t = 1 if (prompt, sample) == ("p2", 1) else int(rng.integers(3, 9))
            a32 = np.zeros(t) if step == 0 else rng.exponential(size=t)
            a = a32 + (0.0 if step == 0 else 0.5) * rng.exponential(size=t)
            if t > 3:
                a[1] = a[2]  # a tie in the low-precision values
            frames.append(
                pd.DataFrame(
                    {
                        "run": "arca-r8-s0",
                        "method": "arca",
                        "rank": 8,
                        "seed": 0,
                        "step": step,
                        "prompt_id": prompt,
                        "sample": sample,
                        "pos": np.arange(t),
                        "token": "7",
                        "a_arca": a,
                        "w_arca": np.ones(t) if a.sum() == 0 else a / a.mean(),
                        "a32_arca": a32,
                    }
                )
            )
    bf16 = pd.concat(frames, ignore_index=True)
    fp32 = bf16.drop(columns="a32_arca").assign(run="uniform-r8-s0", method="uniform")
    return pd.concat([bf16, fp32], ignore_index=True).sample(frac=1.0, random_state=2)  # order must not matter


def _padded(frame: pd.DataFrame, column: str) -> tuple[torch.Tensor, torch.Tensor]:
    frame = frame.sort_values(["prompt_id", "sample", "pos"])
    groups = [g[column].to_numpy() for _, g in frame.groupby(["prompt_id", "sample"], sort=True)]
    width = max(len(g) for g in groups)
    values = torch.zeros(len(groups), width, dtype=torch.float64)
    mask = torch.zeros(len(groups), width, dtype=torch.long)
    for i, g in enumerate(groups):
        values[i, : len(g)], mask[i, : len(g)] = torch.tensor(g), 1
    return values, mask


def test_noise_table_equals_arca_precision_per_checkpoint():
    dumps = _noise_dumps()
    credit = CreditConfig(method="arca", scheme="softmax", tau=0.5, mix=0.8)
    table = noise_table(dumps, {"arca": credit, "uniform": CreditConfig(method="uniform")})
    assert list(table.columns) == list(NOISE_COLUMNS)
    assert set(table["run"]) == {"arca-r8-s0"} and len(table) == 3  # the float32 run has nothing to compare
    for row in table.itertuples():
        rows = dumps[(dumps.run == row.run) & (dumps.step == row.step)]
        a, mask = _padded(rows, "a_arca")
        a32, _ = _padded(rows, "a32_arca")
        assert row.noise_share == pytest.approx(noise_share(a, a32, mask), rel=1e-12, abs=0)
        want_rho = rank_correlation(a, a32, mask)
        assert (math.isnan(row.rank_corr) and math.isnan(want_rho)) or abs(row.rank_corr - want_rho) < 1e-12
        assert row.noise_dominated == (noise_share(a, a32, mask) >= 1)
        w32, fb32 = normalize(a32, mask, "softmax", 0.5, mix=0.8)
        assert row.gini32 == pytest.approx(gini(w32, mask).mean(), rel=1e-6)
        assert row.etr32 == pytest.approx(effective_token_ratio(w32, mask).mean(), rel=1e-6)
        assert row.fallback_rate32 == pytest.approx(fb32.double().mean().item())
        w, _ = _padded(rows, "w_arca")
        assert row.gini == pytest.approx(gini(w, mask).mean(), rel=1e-9)
        assert row.tokens == int(mask.sum()) and row.trajectories == 4
    init = table[table.step == 0].iloc[0]
    assert init.phase == "init" and init.noise_share == 0.0 and math.isnan(init.rank_corr)
    assert init.fallback_rate == 1.0 and init.fallback_rate32 == 1.0
    assert set(table.phase) == {"init", "mid", "final"}


def test_noise_table_flags_noise_with_no_signal_and_is_empty_without_a32():
    dumps = _noise_dumps()
    dumps = dumps[dumps.run == "arca-r8-s0"].copy()
    dumps.loc[dumps.step == 0, "a_arca"] = 0.1  # bf16 "residual" where float32 says exactly 0
    table = noise_table(dumps, {"arca": CreditConfig(method="arca")})
    init = table[table.step == 0].iloc[0]
    assert math.isinf(init.noise_share) and init.noise_dominated
    empty = noise_table(dumps.drop(columns="a32_arca"), {})
    assert empty.empty and list(empty.columns) == list(NOISE_COLUMNS)


def test_within_spearman_matches_pandas():
    rng = np.random.default_rng(0)
    traj = np.repeat(np.arange(4), [5, 1, 3, 6])
    x, y = rng.random(15), rng.random(15)
    x[6:9] = 2.0  # a constant trajectory
    rho = within_spearman(traj, x, y, 4)
    frame = pd.DataFrame({"t": traj, "x": x, "y": y})
    want = frame.groupby("t").apply(lambda g: g["x"].rank().corr(g["y"].rank()), include_groups=False)
    np.testing.assert_allclose(rho[[0, 3]], want.to_numpy()[[0, 3]], rtol=1e-12)
    assert np.isnan(rho[1]) and np.isnan(rho[2])


def test_fallback_flags_follow_the_credit_rule():
    """Tiny saliences (raw mass between eps * T and ~sqrt(eps)) fall back only under the paper's rule, in the
    trajectory table and in the noise table's float32 renormalization alike."""
    dumps = _dumps()
    dumps["a_kl"] = dumps["a_kl"] * 1e-7
    raw = trajectory_table(dumps, ["kl"], [], sharpening=2.0)
    sharp = trajectory_table(dumps, ["kl"], [], sharpening=2.0, fallback="sharpened_sum")
    assert not raw["fallback"].any() and sharp["fallback"].all()
    noisy = _noise_dumps()
    noisy[["a_arca", "a32_arca"]] *= 1e-7
    for rule, expected in (("raw_mean", 0.0), ("sharpened_sum", 1.0)):  # step 2: every row is tiny, none zero
        credit = {"arca": CreditConfig("arca", sharpening=2.0, fallback=rule), "uniform": CreditConfig("uniform")}
        mid = noise_table(noisy, credit).query("step == 2").iloc[0]
        assert (mid.fallback_rate, mid.fallback_rate32) == (expected, expected), rule
