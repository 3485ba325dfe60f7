"""SPEC 9 scores: planted signals at their extremes, uniform weights exactly at chance, permuted controls at
chance within their intervals, NaN for completions that cannot be scored."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from arca import faithfulness_scores
from arca.analysis.faithfulness import completion_scores, permuted_weights, summarize
from arca.analysis.faithfulness_figure import faithfulness_figure
from arca.analysis.faithfulness_table import faithfulness_cells
from arca.analysis.heatmap import heatmap_pages


def _synthetic(n: int = 200, t: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    decisive = torch.rand(n, t, generator=g) < 0.25
    decisive[:, 0], decisive[:, 1] = True, False  # every row has both kinds
    mask = torch.ones(n, t, dtype=torch.bool)
    return decisive, mask, g


def test_planted_signal_on_decisive_tokens_gets_auc_one():
    decisive, mask, _ = _synthetic()
    w = decisive.double() * 3.0 + 0.01
    s = faithfulness_scores(w, decisive, mask)
    assert torch.equal(s["auc"], torch.ones(len(w), dtype=torch.float64))
    assert (s["lift"] > 1).all()
    anti = faithfulness_scores(-w, decisive, mask)
    assert torch.equal(anti["auc"], torch.zeros(len(w), dtype=torch.float64))


def test_uniform_weights_sit_exactly_at_chance():
    decisive, mask, _ = _synthetic(t=40)  # 40 positions: the top-5% cut is 2 of 40 tied weights
    s = faithfulness_scores(torch.ones(decisive.shape), decisive, mask)
    share = decisive.double().mean(1)
    assert torch.equal(s["auc"], torch.full_like(s["auc"], 0.5))
    assert torch.equal(s["lift"], torch.ones_like(s["lift"]))
    torch.testing.assert_close(s["top_hit"], share, rtol=0, atol=1e-12)  # not an artifact of position order


def test_auc_counts_ties_half_and_top_hit_breaks_cut_ties_in_expectation():
    w = torch.tensor([[3.0, 1.0, 1.0, 0.0, 1.0, 1.0] + [0.0] * 14])  # 20 positions: k = 1
    decisive = torch.zeros_like(w, dtype=torch.bool)
    decisive[0, [1, 3]] = True
    mask = torch.ones_like(decisive)
    s = faithfulness_scores(w, decisive, mask)
    # 18 non-decisive: 3.0, three 1.0s, 14 zeros. Decisive 1.0 beats 14 and ties 3; decisive 0.0 ties 14
    assert s["auc"].item() == (14 + 1.5 + 7) / (2 * 18)
    assert s["top_hit"].item() == 0.0  # the single heaviest (3.0) is not decisive
    w[0, 0] = 1.0  # now five positions tie at the cut for one slot, one of them decisive
    assert faithfulness_scores(w, decisive, mask)["top_hit"].item() == pytest.approx(1 / 5)


def test_rows_without_both_kinds_or_outside_the_mask_are_nan():
    w = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    decisive = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    s = faithfulness_scores(w, decisive, mask)
    assert not math.isnan(s["auc"][0]) and all(math.isnan(s[m][1]) for m in s)
    assert all(math.isnan(s[m][2]) for m in s)  # its only decisive position is not scored


def test_permutation_keeps_each_rows_values_and_padding():
    w = torch.arange(12, dtype=torch.float64).reshape(2, 6)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    p = permuted_weights(w, valid, torch.Generator().manual_seed(3))
    assert torch.equal(p[0, 4:], w[0, 4:])
    for row in range(2):
        assert sorted(p[row][valid[row]].tolist()) == sorted(w[row][valid[row]].tolist())
    assert not torch.equal(p, w)


def _dump_and_effects(n: int = 120, t: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows, effects = [], []
    for i in range(n):
        decisive = rng.random(t) < 0.3
        decisive[0], decisive[1] = True, False
        for pos in range(t):
            planted = 2.0 if decisive[pos] else 0.5
            rows.append(
                {
                    "prompt_id": f"p{i // 4}",
                    "sample": i % 4,
                    "pos": pos,
                    "w_uniform": 1.0,
                    "w_planted": planted + rng.random() * 0.1,
                    "w_noise": rng.exponential(),
                }
            )
            effects.append({"prompt_id": f"p{i // 4}", "sample": i % 4, "pos": pos, "decisive": bool(decisive[pos])})
    return pd.DataFrame(rows), pd.DataFrame(effects)


def test_permuted_controls_land_at_chance_within_their_intervals():
    dump, effects = _dump_and_effects()
    scores = completion_scores(dump, effects, ["uniform", "planted", "noise"], seed=0)
    summary = summarize(scores.assign(run="r", step=3), bootstrap_samples=2000).set_index("signal")
    for signal in ("planted (permuted)", "noise (permuted)", "noise"):
        row = summary.loc[signal]
        assert row["auc_lo"] <= 0.5 <= row["auc_hi"], (signal, row)
        assert row["lift_lo"] <= 1.0 <= row["lift_hi"], (signal, row)
    planted = summary.loc["planted"]
    assert planted["auc"] == 1.0 and planted["auc_lo"] > 0.9 and planted["lift_lo"] > 1.5
    uniform = summary.loc["uniform"]
    assert uniform["auc"] == 0.5 and uniform["lift"] == 1.0
    assert uniform["top_hit"] == pytest.approx(uniform["decisive_share"], abs=1e-12)
    assert (summary["completions"] == 120).all() and (summary["step"] == 3).all()


def test_summary_is_seeded_and_reports_uncounted_completions():
    dump, effects = _dump_and_effects(n=20)
    effects.loc[effects["prompt_id"] == "p0", "decisive"] = False  # 4 completions with no decisive position
    scores = completion_scores(dump, effects, ["noise"], seed=1).assign(run="r", step=0)
    a, b = summarize(scores, bootstrap_samples=500), summarize(scores, bootstrap_samples=500)
    pd.testing.assert_frame_equal(a, b)
    assert set(a["completions"]) == {16} and set(a["completions_total"]) == {20}


def _summary() -> pd.DataFrame:
    dump, effects = _dump_and_effects(n=40)
    scores = completion_scores(dump, effects, ["planted", "uniform", "noise"], seed=0).assign(run="r-arca", step=2)
    return summarize(scores, bootstrap_samples=300)


def test_table_orders_signals_and_puts_each_control_after_its_signal():
    cells = faithfulness_cells(_summary())
    assert list(cells["signal"]) == [
        "uniform",
        "uniform (permuted)",
        "noise",
        "noise (permuted)",
        "planted",
        "planted (permuted)",
    ]  # SPEC order first, then the others sorted
    planted = cells.set_index("signal").loc["planted"]
    assert planted["auc"].startswith("1.000 [1.000, 1.000]") and planted["completions"] == "40/40"
    empty = _summary().assign(auc=float("nan"))
    assert (faithfulness_cells(empty)["auc"] == "n/a").all()


def test_figure_and_heatmap_marks(tmp_path):
    out = faithfulness_figure(_summary(), tmp_path / "faithfulness.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    again = faithfulness_figure(_summary(), tmp_path / "again.png")
    assert again.read_bytes() == out.read_bytes()
    dump, effects = _dump_and_effects(n=1, t=6)  # one completion: the page shows it
    dump = dump.assign(run="r-arca", step=2, token_id=7, token="x", reward=1.0)
    effects = effects.assign(run="r-arca", step=2)
    effects = effects[effects["pos"] < 4]  # positions 4, 5 not scored
    pages = heatmap_pages(dump, tmp_path / "pages", "r-arca", max_prompts=1, seed=0, effects=effects)
    text = pages[1].read_text(encoding="utf-8")
    shown = effects
    signals = 3  # w_uniform, w_planted, w_noise rows
    assert text.count("outline:2px solid #000;outline-offset") == signals * int(shown["decisive"].sum())
    assert text.count(";border-bottom:2px dotted") == signals * int((~shown["decisive"]).sum())
    assert "Counterfactual test (SPEC 9)" in text
    plain = heatmap_pages(dump, tmp_path / "plain", "r-arca", max_prompts=1, seed=0)
    assert "outline" not in plain[1].read_text(encoding="utf-8")


def test_tables_stage_writes_the_faithfulness_table_with_lineage(tmp_path, monkeypatch):
    from stages import tables

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/faithfulness/r-arca").mkdir(parents=True)
    _summary().to_parquet("data/faithfulness/r-arca/scores.parquet")
    lin = pd.DataFrame({"run": ["r-arca"], "adapter_md5": ["a" * 32 + ".dir"], "dump_md5": ["d" * 32]})
    scores = tables.read_faithfulness(lin)
    assert (scores["dump_md5"] == "d" * 32).all() and scores["faithfulness_md5"].str.endswith(".dir").all()
    tables.write_table("faithfulness", faithfulness_cells(scores).assign(git_rev="rev"), "caption", "note")
    md = (tmp_path / "results/tables/faithfulness.md").read_text()
    assert "| planted (permuted) | r-arca | 2 |" in md and "dump_md5" in md
    assert "planted (permuted)" in (tmp_path / "results/tables/faithfulness.tex").read_text()
    assert tables.read_faithfulness(lin.iloc[:0]).empty is False  # lineage of a run the list lacks is looked up
