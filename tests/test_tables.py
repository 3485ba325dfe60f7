import json
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from arca.tables import (
    NO_LOW_PRECISION,
    NOISE_FOOTNOTE,
    accuracy_table,
    concentration_table,
    noise_summary_table,
    to_latex,
    to_markdown,
)
from stages import tables as tables_stage


def _evals():
    rows = []
    for method in ("uniform", "arca"):
        for seed, acc in ((0, 0.25), (1, 0.75)):
            run = f"{method}-r8-s{seed}"
            rows.append(
                {
                    "run": run,
                    "method": method,
                    "rank": 8,
                    "seed": seed,
                    "eval_set": "math",
                    "pass@1": acc,
                    "mean@k": acc / 2,
                }
            )
    return pd.DataFrame(rows)


def test_accuracy_table_mean_std_budget_and_lineage():
    evals = _evals()
    budgets = pd.DataFrame({"run": evals["run"].unique(), "rollouts": 96, "generated_tokens": [10, 20, 30, 50]})
    lineage = pd.DataFrame({"run": evals["run"].unique(), "adapter_md5": ["a", "b", "c", "d"]})
    table = accuracy_table(evals, budgets, lineage)
    arca = table[table.method == "arca"].iloc[0]
    assert arca["math pass@1"] == "0.500 ± 0.354"
    assert arca["seeds"] == 2 and arca["rollouts"] == 96 and arca["generated_tokens"] == 40
    assert arca["runs"] == "arca-r8-s0;arca-r8-s1" and arca["adapter_md5"] == "c;d"


def test_concentration_table_groups_by_signal_rank_phase():
    summary = pd.DataFrame(
        {
            "run": ["a", "b", "a"],
            "step": [0, 0, 4],
            "phase": ["init", "init", "final"],
            "signal": "kl",
            "rank": 8,
            "over": "weight",
            "gini_mean": [0.2, 0.4, 0.5],
            "etr_mean": [0.9, 0.7, 0.5],
            "top_k_mass_mean": 0.1,
            "agnostic_share_mean": 0.3,
            "frac_uniform": 0.0,
            "frac_middle": 1.0,
            "frac_concentrated": 0.0,
            "fallback_rate": 0.0,
        }
    )
    lineage = pd.DataFrame({"run": ["a", "b"], "dump_md5": ["x", "y"]})
    table = concentration_table(summary, lineage)
    init = table[table.phase == "init"].iloc[0]
    assert abs(init["gini"] - 0.3) < 1e-9 and init["runs"] == "a;b" and init["dump_md5"] == "x;y"


def test_renderers_escape():
    df = pd.DataFrame({"method": ["a_b|c"], "x": [0.5], "runs": ["r"]})
    assert "a_b\\|c" in to_markdown(df)
    tex = to_latex(df, "cap & 50%")
    assert "\\toprule" in tex and "a\\_b" in tex and "cap \\& 50\\%" in tex and "runs" not in tex


def _noise(share_final: float = 1.5) -> pd.DataFrame:
    """noise.parquet rows: arca in two runs at init/final, kl in one run at final."""
    return pd.DataFrame(
        {
            "run": ["a", "b", "a", "b", "a"],
            "method": "arca",
            "rank": 8,
            "seed": 0,
            "step": [0, 0, 4, 4, 4],
            "phase": ["init", "init", "final", "final", "final"],
            "signal": ["arca", "arca", "arca", "arca", "kl"],
            "noise_share": [0.0, 0.0, share_final, 0.5, 0.2],
            "rank_corr": [float("nan"), float("nan"), 0.4, 0.6, 0.9],
            "gini": [0.0, 0.0, 0.3, 0.5, 0.8],
            "gini32": [0.0, 0.0, 0.7, 0.9, 0.8],
            "etr": 1.0,
            "etr32": 0.5,
        }
    ).assign(noise_dominated=lambda f: f["noise_share"] >= 1)


def test_noise_summary_table_means_and_marks_dominated():
    lineage = pd.DataFrame({"run": ["a", "b"], "dump_md5": ["x", "y"]})
    table = noise_summary_table(_noise(), lineage)
    final = table[(table.signal == "arca") & (table.phase == "final")].iloc[0]
    assert final["noise_share"] == 1.0 and final["noise_dominated"] == "yes"  # mean of 1.5 and 0.5
    assert abs(final["gini"] - 0.4) < 1e-9 and abs(final["gini_fp32"] - 0.8) < 1e-9
    assert final["runs"] == "a;b" and final["dump_md5"] == "x;y" and final["checkpoints"] == 2
    assert final["dominated_checkpoints"] == 1
    kl = table[table.signal == "kl"].iloc[0]
    assert kl["noise_dominated"] == "no" and kl["runs"] == "a"
    empty = noise_summary_table(_noise().iloc[:0], lineage)
    assert empty.empty and {"noise_share", "rank_corr", "gini", "gini_fp32", "runs", "dump_md5"} <= set(empty)


def test_concentration_table_marks_noise_dominated_signals():
    summary = pd.DataFrame(
        {
            "run": ["a", "a", "a"],
            "step": [4, 4, 4],
            "phase": "final",
            "signal": ["arca", "kl", "surprisal"],
            "rank": 8,
            "over": "weight",
            **dict.fromkeys(["gini_mean", "etr_mean", "top_k_mass_mean", "agnostic_share_mean"], 0.5),
            **dict.fromkeys(["frac_uniform", "frac_middle", "frac_concentrated", "fallback_rate"], 0.0),
        }
    )
    lineage = pd.DataFrame({"run": ["a"], "dump_md5": ["x"]})
    table = concentration_table(summary, lineage, _noise(share_final=3.0)).set_index("signal")
    assert table.loc["arca", "noise_dominated"] == "yes" and table.loc["arca", "noise_share"] == 1.75
    assert table.loc["kl", "noise_dominated"] == "no"
    assert table.loc["surprisal", "noise_dominated"] == "n/a"  # not recomputed in float32
    assert "noise_dominated" not in concentration_table(summary, lineage, _noise().iloc[:0]).columns


def _stage_inputs(root: Path, noise: pd.DataFrame) -> None:
    (root / "data/eval").mkdir(parents=True)
    (root / "data/diagnostics").mkdir(parents=True)
    record = {"run": "a", "method": "arca", "rank": 8, "seed": 0, "sets": {"math": {"pass@1": 0.5, "mean@2": 0.25}}}
    (root / "data/eval/a.json").write_text(json.dumps(record))
    summary = pd.DataFrame(
        {
            "run": "a",
            "method": "arca",
            "rank": 8,
            "seed": 0,
            "step": [0, 4],
            "phase": ["init", "final"],
            "signal": "arca",
            "over": "weight",
            **dict.fromkeys(["gini_mean", "etr_mean", "top_k_mass_mean", "agnostic_share_mean"], 0.5),
            **dict.fromkeys(["frac_uniform", "frac_middle", "frac_concentrated", "fallback_rate"], 0.0),
        }
    )
    summary.to_parquet(root / "data/diagnostics/summary.parquet")
    agreement = pd.DataFrame(
        {"run": "a", "step": [4], "signal_a": "kl", "signal_b": "arca", "spearman_mean": 0.5, "n": 4}
    )
    agreement.to_parquet(root / "data/diagnostics/agreement.parquet")
    noise.to_parquet(root / "data/diagnostics/noise.parquet")
    (root / "params.yaml").write_text("{}\n")


def test_tables_stage_writes_noise_table(tmp_path, monkeypatch):
    _stage_inputs(tmp_path, _noise()[_noise().run == "a"])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(tables_stage.main, [])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "results/tables/noise.md").read_text()
    assert "| signal | rank | phase |" in md and "| arca | 8 | final |" in md and NOISE_FOOTNOTE in md
    assert (tmp_path / "results/tables/noise.tex").read_text().count("\\midrule") == 1
    assert "noise_dominated" in (tmp_path / "results/tables/concentration.md").read_text()


def test_tables_stage_says_when_no_run_is_low_precision(tmp_path, monkeypatch):
    _stage_inputs(tmp_path, _noise().iloc[:0])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(tables_stage.main, [])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "results/tables/noise.md").read_text().splitlines()
    assert md[1:] == [NO_LOW_PRECISION]
    assert pd.read_csv(tmp_path / "results/tables/noise.csv").empty  # header only
    assert "noise_dominated" not in (tmp_path / "results/tables/concentration.md").read_text()
