import numpy as np
import pandas as pd

from arca.concentration import phase_of, signal_agreement, trajectory_table
from arca.diagnostics import effective_token_ratio, gini

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
