import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from click.testing import CliRunner

from arca.analysis import tables as arca_tables
from arca.analysis.stats import clustered_wilson_interval, paired_bootstrap_interval, wilson_interval
from arca.analysis.tables import (
    ACCURACY_FOOTNOTE,
    NO_LOW_PRECISION,
    NOISE_FOOTNOTE,
    accuracy_stats,
    accuracy_table,
    concentration_table,
    noise_summary_table,
    run_accuracy,
    to_latex,
    to_markdown,
)
from stages import tables as tables_stage
from tests.params import default_params


def _scores(runs: dict[str, tuple[str, int, int, list[float], list[float]]], k: int = 2) -> pd.DataFrame:
    """Per-problem score rows: run -> (method, rank, seed, greedy 0/1 per problem, mean_k per problem), one
    eval set `math`, grader math_verify; pass@k = any sample right."""
    rows = []
    for run, (method, rank, seed, greedy, mean_k) in runs.items():
        for i, (g, m) in enumerate(zip(greedy, mean_k)):
            rows.append(
                {
                    "run": run,
                    "method": method,
                    "rank": rank,
                    "seed": seed,
                    "k": k,
                    "grader": "math_verify",
                    "eval_set": "math",
                    "prompt_id": f"p{i}",
                    "pass@1": g,
                    "mean@k": m,
                    "pass@k": float(m > 0),
                }
            )
    return pd.DataFrame(rows)


def _lineage_and_budget(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = sorted(scores["run"].unique())
    trained = [r for r in runs if r != "base"]  # the base model has no budget.json
    budgets = pd.DataFrame(
        {"run": trained, "rollouts": 96, "generated_tokens": [10 * (i + 1) for i in range(len(trained))]}
    )
    lineage = pd.DataFrame({"run": runs, "adapter_md5": [f"md5-{r}" for r in runs]})
    return budgets, lineage


ONE_SEED = {
    "base": ("base", 0, -1, [1, 0, 0, 0], [0.5, 0.0, 0.0, 0.0]),
    "uniform-r8-s0": ("uniform", 8, 0, [1, 0, 0, 0], [1.0, 0.5, 0.5, 0.0]),
    "arca-r8-s0": ("arca", 8, 0, [1, 1, 1, 0], [1.0, 0.5, 0.5, 0.0]),
}


def test_accuracy_one_seed_shows_wilson_intervals_and_the_paired_difference():
    scores = _scores(ONE_SEED)
    stats_ = accuracy_stats(scores, *_lineage_and_budget(scores)).set_index("method")
    arca = stats_.loc["arca"]
    assert arca["seeds"] == 1 and arca["n"] == 4 and arca["k"] == 2 and math.isnan(arca["pass@1_sd"])
    assert (arca["pass@1"], arca["pass@1_lo"], arca["pass@1_hi"]) == (0.75, *wilson_interval(3, 4))
    # mean@k (1, .5, .5, 0) of k = 2: effective sample size 6 (tests/analysis/test_stats.py) -> Wilson(3, 6)
    assert (arca["mean@k_lo"], arca["mean@k_hi"]) == wilson_interval(3, 6)
    assert arca["pass@k"] == 0.75 and (arca["pass@k_lo"], arca["pass@k_hi"]) == wilson_interval(3, 4)
    # paired on the same problems: arca - uniform = (0, 1, 1, 0) for pass@1, (0, 0, 0, 0) for mean@k
    diffs = np.array([0.0, 1.0, 1.0, 0.0])
    assert arca["pass@1_vs_uniform"] == 0.5
    assert (arca["pass@1_vs_uniform_lo"], arca["pass@1_vs_uniform_hi"]) == paired_bootstrap_interval(diffs)
    assert (arca["mean@k_vs_uniform"], arca["mean@k_vs_uniform_lo"], arca["mean@k_vs_uniform_hi"]) == (0, 0, 0)
    assert math.isnan(stats_.loc["uniform", "pass@1_vs_uniform"]) and math.isnan(
        stats_.loc["base", "pass@1_vs_uniform"]
    )
    assert arca["runs"] == "arca-r8-s0" and arca["adapter_md5"] == "md5-arca-r8-s0" and arca["rollouts"] == 96

    table = accuracy_table(accuracy_stats(scores, *_lineage_and_budget(scores))).set_index("method")
    assert table.loc["arca", "pass@1"] == "0.750 [0.301, 0.954]"
    assert table.loc["arca", "mean@k"] == "0.500 [0.188, 0.812]"
    assert table.loc["arca", "Δ pass@1 vs uniform"].startswith("+0.500 [")
    assert table.loc["arca", "Δ mean@k vs uniform"] == "+0.000 [+0.000, +0.000]"  # never "-0.000"
    assert table.loc["uniform", "Δ pass@1 vs uniform"] == "baseline"
    assert table.loc["base", "Δ pass@1 vs uniform"] == "n/a" and table.loc["base", "rollouts"] == "n/a"
    assert "±" not in to_markdown(table)  # one seed: no spread that does not exist
    assert list(table.index) == ["base", "uniform", "arca"]  # base model, baseline, then the methods


def test_a_permuted_run_is_its_own_method_right_after_its_signal():
    from arca.credit.config import PERMUTED_SUFFIX

    runs = {
        **ONE_SEED,
        "arca_perm-r8-s0": ("arca_perm", 8, 0, [1, 0, 1, 0], [0.5, 0.5, 0.5, 0.0]),
        "arca_local-r8-s0": ("arca_local", 8, 0, [1, 0, 0, 0], [0.5, 0.0, 0.0, 0.0]),
    }
    scores = _scores(runs)
    stats_ = accuracy_stats(scores, *_lineage_and_budget(scores))
    assert list(stats_["method"]) == ["base", "uniform", "arca", "arca_perm", "arca_local"]
    perm = stats_.set_index("method").loc["arca_perm"]
    assert perm["runs"] == "arca_perm-r8-s0" and perm["pass@1"] == 0.5 and perm["pass@1_vs_uniform"] == 0.25
    assert arca_tables.PERMUTED_SUFFIX == PERMUTED_SUFFIX


def test_accuracy_over_seeds_shows_mean_and_sample_std_and_pairs_by_seed():
    runs = {
        "uniform-r8-s0": ("uniform", 8, 0, [1, 0, 0, 0], [0.5, 0.0, 0.0, 0.0]),
        "uniform-r8-s1": ("uniform", 8, 1, [1, 1, 1, 0], [1.0, 1.0, 0.5, 0.0]),
        "arca-r8-s0": ("arca", 8, 0, [1, 0, 0, 0], [0.5, 0.0, 0.0, 0.0]),  # = uniform s0
        "arca-r8-s1": ("arca", 8, 1, [1, 1, 1, 0], [1.0, 1.0, 0.5, 0.0]),  # = uniform s1
    }
    scores = _scores(runs)
    stats_ = accuracy_stats(scores, *_lineage_and_budget(scores)).set_index("method")
    arca = stats_.loc["arca"]
    assert arca["seeds"] == 2 and arca["pass@1"] == 0.5 and math.isclose(arca["pass@1_sd"], math.sqrt(0.125))
    # seed-paired: every difference is 0 (pairing across seeds would give +-1 on three problems)
    assert (arca["pass@1_vs_uniform"], arca["pass@1_vs_uniform_lo"], arca["pass@1_vs_uniform_hi"]) == (0, 0, 0)
    # the interval is over problems of the seed-averaged scores (.5 draws of 2 per problem for pass@1)
    per_problem = np.array([1.0, 0.5, 0.5, 0.0])
    assert (arca["pass@1_lo"], arca["pass@1_hi"]) == clustered_wilson_interval(per_problem, 2)
    table = accuracy_table(accuracy_stats(scores, *_lineage_and_budget(scores))).set_index("method")
    assert table.loc["arca", "pass@1"] == "0.500 ± 0.354" and "[" not in table.loc["arca", "pass@1"]
    assert table.loc["arca", "runs"] == "arca-r8-s0;arca-r8-s1"
    assert table.loc["arca", "adapter_md5"] == "md5-arca-r8-s0;md5-arca-r8-s1"


def test_paired_difference_falls_back_to_uniform_of_the_same_rank():
    runs = {
        "uniform-r8-s0": ("uniform", 8, 0, [0, 0, 0, 0], [0.0] * 4),
        "uniform-r32-s0": ("uniform", 32, 0, [1, 1, 1, 1], [1.0] * 4),
        "arca-r8-s5": ("arca", 8, 5, [1, 1, 0, 0], [0.5] * 4),  # no uniform seed 5: uniform rank 8
    }
    scores = _scores(runs)
    arca = accuracy_stats(scores, *_lineage_and_budget(scores)).set_index("method").loc["arca"]
    assert arca["pass@1_vs_uniform"] == 0.5 and arca["mean@k_vs_uniform"] == 0.5
    no_baseline = scores[scores["method"] != "uniform"]
    table = accuracy_table(accuracy_stats(no_baseline, *_lineage_and_budget(no_baseline)))
    assert table.loc[0, "Δ pass@1 vs uniform"] == "n/a"


def test_accuracy_without_samples_or_pass_at_k_says_na():
    scores = _scores(ONE_SEED, k=0).assign(**{"mean@k": float("nan"), "pass@k": float("nan")})
    table = accuracy_table(accuracy_stats(scores, *_lineage_and_budget(scores))).set_index("method")
    assert table.loc["arca", "mean@k"] == "n/a" and table.loc["arca", "pass@k"] == "n/a"
    assert table.loc["arca", "Δ mean@k vs uniform"] == "n/a" and table.loc["arca", "pass@1"].startswith("0.750 [")


def test_run_accuracy_metrics_per_run_with_intervals_and_difference():
    scores = _scores(ONE_SEED)
    exact = scores.assign(grader="exact", **{"pass@1": 0.0})
    metrics = run_accuracy(pd.concat([scores, exact], ignore_index=True))
    arca = metrics["arca-r8-s0"]["math"]
    assert arca["n"] == 4 and arca["pass@1"] == 0.75 and arca["pass@1_lo"] == round(wilson_interval(3, 4)[0], 6)
    assert arca["pass@1_vs_uniform"] == 0.5 and "pass@1_vs_uniform_hi" in arca and "pass@1_sd" not in arca
    assert arca["exact_pass@1"] == 0.0 and arca["exact_pass@1_hi"] == round(wilson_interval(0, 4)[1], 6)
    assert "pass@1_vs_uniform" not in metrics["uniform-r8-s0"]["math"] and "mean@k" in metrics["base"]["math"]
    assert all(not (isinstance(v, float) and math.isnan(v)) for run in metrics.values() for v in run["math"].values())


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
    # run a: the evaluation format with pass_k and the exact grader; run u: an older one (math-verify greedy
    # and mean_k only), which the stage must still read
    record = {"run": "a", "method": "arca", "rank": 8, "seed": 0, "k": 2, "sets": {"math": {"pass@1": 0.5}}}
    (root / "data/eval/a.json").write_text(json.dumps(record))
    per_problem = pd.DataFrame(
        {
            "prompt_id": ["p0", "p1", "p2", "p3"],
            "eval_set": "math",
            "greedy": [1.0, 1.0, 0.0, 0.0],
            "mean_k": [1.0, 0.5, 0.0, 0.0],
            "pass_k": [1.0, 1.0, 0.0, 0.0],
            "exact_greedy": [1.0, 0.0, 0.0, 0.0],
            "exact_mean_k": [0.5, 0.0, 0.0, 0.0],
            "exact_pass_k": [1.0, 0.0, 0.0, 0.0],
            "completion": "x",
        }
    )
    per_problem.to_parquet(root / "data/eval/a.parquet")
    record = {"run": "u", "method": "uniform", "rank": 8, "seed": 0, "k": 2, "sets": {"math": {"pass@1": 0.25}}}
    (root / "data/eval/u.json").write_text(json.dumps(record))
    per_problem[["prompt_id", "eval_set", "completion"]].assign(
        greedy=[1.0, 0.0, 0.0, 0.0], mean_k=[0.5, 0.5, 0.0, 0.0]
    ).to_parquet(root / "data/eval/u.parquet")
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
    (root / "params.yaml").write_text(yaml.safe_dump(default_params()))  # the stage validates it first


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


def test_tables_stage_accuracy_intervals_csv_numbers_and_metrics(tmp_path, monkeypatch):
    _stage_inputs(tmp_path, _noise().iloc[:0])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(tables_stage.main, [])
    assert result.exit_code == 0, result.output
    tables = tmp_path / "results/tables"
    csv = pd.read_csv(tables / "accuracy.csv").set_index(["grader", "method"])
    assert csv.loc[("math_verify", "arca"), "pass@1_lo"] == round(wilson_interval(2, 4)[0], 6)
    assert csv.loc[("math_verify", "arca"), "pass@1_vs_uniform"] == 0.25
    assert ("exact", "arca") in csv.index and ("exact", "uniform") not in csv.index  # u has no exact grader
    assert math.isnan(csv.loc[("math_verify", "uniform"), "pass@k"])  # u has no pass_k column
    assert {"runs", "adapter_md5", "git_rev"} <= set(csv.columns)
    md = (tables / "accuracy.md").read_text()
    assert "| math_verify | math | arca | 8 | 1 | 4 | 2 | 0.500 [0.150, 0.850] |" in md and ACCURACY_FOOTNOTE in md
    assert "± 0.000" not in md
    tex = (tables / "accuracy.tex").read_text()
    assert "$\\Delta$ pass@1 vs uniform" in tex and "0.500 [0.150, 0.850]" in tex
    metrics = json.loads((tmp_path / "metrics/accuracy.json").read_text())
    assert metrics["a"]["math"]["pass@1"] == 0.5 and metrics["a"]["math"]["exact_pass@1"] == 0.25
    assert metrics["a"]["math"]["pass@1_vs_uniform"] == 0.25 and "pass@k" not in metrics["u"]["math"]
    first = {p.name: p.read_bytes() for p in [*tables.iterdir(), tmp_path / "metrics/accuracy.json"]}
    assert CliRunner().invoke(tables_stage.main, []).exit_code == 0
    assert first == {p.name: p.read_bytes() for p in [*tables.iterdir(), tmp_path / "metrics/accuracy.json"]}


def test_tables_stage_writes_the_papers_training_columns(tmp_path, monkeypatch):
    _stage_inputs(tmp_path, _noise().iloc[:0])
    for run, method, gini in (("a", "arca", [0.2, 0.4]), ("u", "uniform", [0.0, 0.0])):
        folder = tmp_path / "data/runs" / run
        folder.mkdir(parents=True)
        metrics = {"method": method, "rank": 8, "seed": 0, "steps": 2, "reward_mean": 0.5}
        metrics |= {"gini_mean": sum(gini) / 2, "etr_mean": 0.8, "fallback_rate_mean": 0.5}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "budget.json").write_text(json.dumps({"rollouts": 32, "generations": 8, "generated_tokens": 320}))
        log = "".join(f"{i + 1}\t{g}\t0.8\n" for i, g in enumerate(gini))
        (folder / "log.tsv").write_text("step\tgini\tetr\n" + log)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(tables_stage.main, [])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "results/tables/training.md").read_text()
    lo, hi = wilson_interval(2, 4)
    assert f"| a | arca | 8 | 0 | 2 | 32 | 0.500 [{lo:.3f}, {hi:.3f}] | 0.300 ± 0.141 | 0.800 ± 0.000 | 0.5 |" in md
    csv = pd.read_csv(tmp_path / "results/tables/training.csv").set_index("run")
    assert csv.loc["u", "gini_mean"] == 0.0 and {"git_rev", "adapter_md5"} <= set(csv.columns)


def test_markdown_shows_short_md5s_and_the_csv_keeps_them_whole():
    full = "087581b5808fdea6dbda1eeb1d4d4f54.dir;8ec5b955d9f404e8d93e61ec0daf6bad"
    df = pd.DataFrame({"run": ["arca-r8-s0"], "adapter_md5": [full], "dump_md5": ["none"], "note": ["x" * 32]})
    md = to_markdown(df)
    assert "| arca-r8-s0 | 087581b5;8ec5b955 | none | " + "x" * 32 + " |" in md  # only *_md5 columns are cut
    assert full not in md and full in df.to_csv(index=False)
