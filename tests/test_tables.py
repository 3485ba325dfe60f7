import pandas as pd

from arca.tables import accuracy_table, concentration_table, to_latex, to_markdown


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
