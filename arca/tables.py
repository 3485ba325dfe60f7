"""Results tables (accuracy, concentration, signal agreement) with lineage on every row, rendered as
Markdown, CSV and LaTeX (booktabs)."""

from __future__ import annotations

import math

import pandas as pd

CONCENTRATION_METRICS = ("gini", "etr", "top_k_mass", "agnostic_share")


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.3f} ± {std:.3f}"


def accuracy_table(evals: pd.DataFrame, budgets: pd.DataFrame, lineage: pd.DataFrame) -> pd.DataFrame:
    """One row per method x rank: mean ± std over seeds of every eval set's pass@1 and mean@k, the rollout
    budget, and lineage (run ids, adapter md5s).

    Args:
        evals: run, method, rank, seed, eval_set, pass@1, mean@k (long: one row per run x eval set).
        budgets: run, rollouts, generated_tokens.
        lineage: run, adapter_md5.
    """
    frame = evals.merge(budgets, on="run", how="left").merge(lineage, on="run", how="left")
    rows = []
    for (method, rank), group in frame.groupby(["method", "rank"], sort=True):
        row: dict[str, object] = {"method": method, "rank": int(rank), "seeds": group["seed"].nunique()}
        for eval_set, part in group.groupby("eval_set", sort=True):
            row[f"{eval_set} pass@1"] = _mean_std(part["pass@1"])
            row[f"{eval_set} mean@k"] = _mean_std(part["mean@k"])
        per_run = group.drop_duplicates("run").sort_values("run")
        row["rollouts"] = _int_or_na(per_run["rollouts"].mean())
        row["generated_tokens"] = _int_or_na(per_run["generated_tokens"].mean())
        row["runs"] = ";".join(per_run["run"])
        row["adapter_md5"] = ";".join(per_run["adapter_md5"].fillna("none"))
        rows.append(row)
    return pd.DataFrame(rows)


def concentration_table(summary: pd.DataFrame, lineage: pd.DataFrame) -> pd.DataFrame:
    """One row per signal x rank x phase over normalized weights: mean over runs of the per-run trajectory
    means (Gini, ETR, top-5% mass, agnostic share), regime fractions and fallback rate, with lineage."""
    frame = summary[summary["over"] == "weight"].merge(lineage, on="run", how="left")
    agg = {f"{m}_mean": "mean" for m in CONCENTRATION_METRICS}
    agg |= {"frac_uniform": "mean", "frac_middle": "mean", "frac_concentrated": "mean", "fallback_rate": "mean"}
    out = frame.groupby(["signal", "rank", "phase"], sort=True).agg(agg).round(4).reset_index()
    out = out.rename(columns={f"{m}_mean": m for m in CONCENTRATION_METRICS})
    out = out.rename(columns={"top_k_mass": "top5%_mass"})
    lin = frame.groupby(["signal", "rank", "phase"], sort=True).apply(_lineage_cols, include_groups=False)
    return out.merge(lin.reset_index(), on=["signal", "rank", "phase"])


def agreement_table(agreement: pd.DataFrame, summary: pd.DataFrame, lineage: pd.DataFrame) -> pd.DataFrame:
    """Mean Spearman correlation of weights per signal pair x phase, over runs, with lineage."""
    phases = summary[["run", "step", "phase"]].drop_duplicates()
    frame = agreement.merge(phases, on=["run", "step"]).merge(lineage, on="run", how="left")
    keys = ["signal_a", "signal_b", "phase"]
    out = frame.groupby(keys, sort=True).agg(spearman=("spearman_mean", "mean"), trajectories=("n", "sum"))
    lin = frame.groupby(keys, sort=True).apply(_lineage_cols, include_groups=False)
    return out.round(4).reset_index().merge(lin.reset_index(), on=keys)


def _lineage_cols(group: pd.DataFrame) -> pd.Series:
    per_run = group.drop_duplicates("run").sort_values("run")
    return pd.Series({"runs": ";".join(per_run["run"]), "dump_md5": ";".join(per_run["dump_md5"].fillna("none"))})


def _int_or_na(value: float) -> object:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def to_latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); lineage columns are left to the CSV."""
    shown = df[[c for c in df.columns if c not in ("runs", "adapter_md5", "dump_md5", "git_rev")]]
    cols = "l" * len(shown.columns)
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{_tex(caption)}}}",
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        " & ".join(_tex(str(c)) for c in shown.columns) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(_tex(_cell(v)) for v in row) + " \\\\" for row in shown.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _tex(text: str) -> str:
    for old, new in (
        ("\\", "\\textbackslash{}"),
        ("&", "\\&"),
        ("%", "\\%"),
        ("_", "\\_"),
        ("#", "\\#"),
        ("±", "$\\pm$"),
        ("@", "@"),
    ):
        text = text.replace(old, new)
    return text
