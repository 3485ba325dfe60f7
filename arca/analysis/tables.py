"""Results tables (accuracy, concentration, signal agreement, precision noise) with lineage on every row,
rendered as Markdown, CSV and LaTeX (booktabs). Accuracy carries its uncertainty (arca.analysis.stats): a 95% interval
over problems for one seed, mean ± sample std for several, and the paired difference to `uniform`."""

from __future__ import annotations

import math

import pandas as pd

from arca.analysis.stats import BOOTSTRAP_SAMPLES, clustered_wilson_interval, mean_sd, paired_bootstrap_interval

CONCENTRATION_METRICS = ("gini", "etr", "top_k_mass", "agnostic_share")
NOISE_FOOTNOTE = (
    "noise_share: L2 norm of a - a32 over the L2 norm of a32, where a is the salience in the run's dtype and "
    "a32 its float32 recomputation on the same probe tokens and checkpoint (SPEC 2b); noise_dominated = yes "
    "where it is >= 1 (the salience is mostly rounding noise); n/a: not recomputed in float32 (a float32 run, "
    "or a signal that needs no float32 check)."
)
NO_LOW_PRECISION = (
    "No low-precision run: every dump is float32, so there is no float32 recomputation (a32_ columns) to "
    "compare with and no precision noise to report (SPEC 2b)."
)


# Per-problem scores the accuracy table reports: pass@1 (greedy answer right, 0/1), mean@k (share of the k samples
# right), pass@k (any of the k right, 0/1).
SCORES = ("pass@1", "mean@k", "pass@k")
PAIRED = ("pass@1", "mean@k")  # scores compared with the baseline
BASELINE = "uniform"
PERMUTED_SUFFIX = "_perm"  # arca.credit.config.PERMUTED_SUFFIX (not imported: this module needs no torch)
BASE_MODEL = "base"
ACCURACY_KEYS = ["grader", "eval_set", "method", "rank"]
ACCURACY_FOOTNOTE = (
    "Accuracy over the n held-out problems of each set. One seed: the score and its 95% Wilson interval over "
    "problems in brackets (mean@k: Wilson at the effective sample size of k correlated samples per problem, "
    "arca/analysis/stats.py). Two or more seeds: mean ± sample standard deviation over seeds. Δ vs uniform: the "
    "paired difference to uniform on the same problems (same rank and seed), averaged over seeds, with a "
    "seeded 95% bootstrap interval over problems; [+0.000, +0.000] means no problem scored differently."
)


def accuracy_stats(
    scores: pd.DataFrame,
    budgets: pd.DataFrame,
    lineage: pd.DataFrame,
    *,
    bootstrap_samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per grader x eval set x method x rank, numbers only (the CSV): every score of `SCORES` with its
    95% interval over problems (`<score>_lo`, `<score>_hi`: Wilson, at the effective sample size for averaged
    scores) and its sample std over seeds (`<score>_sd`, NaN for one seed); for `PAIRED` scores the paired
    difference to `BASELINE` (`<score>_vs_uniform`, `_lo`, `_hi`: seeded bootstrap over problems); the rollout
    budget; lineage (run ids, adapter md5s).

    Args:
        scores: one row per run x grader x problem: run, method, rank, seed, k, grader, eval_set, prompt_id,
            pass@1, mean@k, pass@k (NaN where the run has no such score, e.g. k = 0).
        budgets: run, rollouts, generated_tokens.
        lineage: run, adapter_md5.
        bootstrap_samples, seed: of the paired bootstrap (fixed seed: byte-identical tables).
    """
    runs = _run_index(scores).reset_index().merge(budgets, on="run", how="left").merge(lineage, on="run", how="left")
    rows = []
    for (grader, eval_set), sheets in _score_sheets(scores).items():
        meta = _run_index(scores[(scores["grader"] == grader) & (scores["eval_set"] == eval_set)])
        for (method, rank), group in meta.groupby(["method", "rank"], sort=True):
            per_run = runs[runs["run"].isin(group.index)].sort_values("run")
            row: dict[str, object] = {
                "grader": grader,
                "eval_set": eval_set,
                "method": method,
                "rank": int(rank),
                "seeds": len(per_run),
                "n": int(sheets["pass@1"][list(group.index)].notna().any(axis=1).sum()),
                "k": int(group["k"].max()),
            }
            for score in SCORES:
                row |= _score_stats(sheets[score], list(group.index), score, row["k"])
            for score in PAIRED:
                row |= _paired_stats(sheets[score], meta, list(group.index), score, bootstrap_samples, seed)
            row["rollouts"] = _int_or_na(per_run["rollouts"].mean())
            row["generated_tokens"] = _int_or_na(per_run["generated_tokens"].mean())
            row["runs"] = ";".join(per_run["run"])
            row["adapter_md5"] = ";".join(per_run["adapter_md5"].fillna("none"))
            rows.append(row)
    out = pd.DataFrame(rows)
    # reading order: math-verify before other graders, then base model, baseline, the other methods, each
    # permuted control (`arca_perm`, SPEC 3: its own method) right after its signal
    order = pd.DataFrame(
        {
            "g": out["grader"] != "math_verify",
            "m": out["method"].map({BASE_MODEL: 0, BASELINE: 1}).fillna(2),
            "signal": out["method"].str.removesuffix(PERMUTED_SUFFIX),
            "permuted": out["method"].str.endswith(PERMUTED_SUFFIX),
        }
    )
    keys = pd.concat([order, out[["grader", "eval_set", "rank"]]], axis=1)
    ordered = keys.sort_values(["g", "grader", "eval_set", "m", "signal", "permuted", "rank"], kind="stable").index
    return out.loc[ordered].reset_index(drop=True)


def accuracy_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """The Markdown / LaTeX view of `accuracy_stats`: per score "value [low, high]" for one seed and
    "mean ± sd" for two or more (never a spread of one seed), "Δ [low, high]" against uniform (`baseline` on
    uniform's own rows, n/a for the base model), then budget and lineage."""
    accuracy = accuracy.reset_index(drop=True)  # positional concat below
    out = accuracy[[*ACCURACY_KEYS, "seeds", "n", "k"]].copy()
    for score in SCORES:
        out[score] = [_accuracy_cell(row, score) for _, row in accuracy.iterrows()]
    for score in PAIRED:
        out[f"Δ {score} vs {BASELINE}"] = [_difference_cell(row, score) for _, row in accuracy.iterrows()]
    return pd.concat([out, accuracy[["rollouts", "generated_tokens", "runs", "adapter_md5"]]], axis=1)


def run_accuracy(
    scores: pd.DataFrame, *, bootstrap_samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, dict[str, dict[str, float]]]:
    """metrics/accuracy.json: run -> eval set -> {score, score_lo, score_hi, ...} for one run's own scores,
    plus `<score>_vs_uniform` (and _lo, _hi) against the uniform run of the same rank and seed. Keys of the
    grader `math_verify` are unprefixed, others are prefixed `<grader>_` (as in the evaluation JSON)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (grader, eval_set), sheets in _score_sheets(scores).items():
        prefix = "" if grader == "math_verify" else f"{grader}_"
        meta = _run_index(scores[(scores["grader"] == grader) & (scores["eval_set"] == eval_set)])
        for run in meta.index:
            n = int(sheets["pass@1"][run].notna().sum())
            entry = out.setdefault(str(run), {}).setdefault(str(eval_set), {"n": n})
            values: dict[str, float] = {}
            for score in SCORES:
                values |= _score_stats(sheets[score], [run], score, int(meta.loc[run, "k"]))
            for score in PAIRED:
                values |= _paired_stats(sheets[score], meta, [run], score, bootstrap_samples, seed)
            for key, value in values.items():
                if not key.endswith("_sd") and not math.isnan(value):
                    entry[prefix + key] = round(value, 6)
    return {run: dict(sorted(sets.items())) for run, sets in sorted(out.items())}


def _run_index(scores: pd.DataFrame) -> pd.DataFrame:
    """run -> method, rank, seed, k (sorted by run)."""
    return scores[["run", "method", "rank", "seed", "k"]].drop_duplicates("run").set_index("run").sort_index()


def _score_sheets(scores: pd.DataFrame) -> dict[tuple[str, str], dict[str, pd.DataFrame]]:
    """(grader, eval set) -> score -> a (problems x runs) sheet of per-problem scores, prompt ids and runs
    sorted; NaN where a run has no such score (or did not see the problem)."""
    sheets = {}
    for (grader, eval_set), part in scores.groupby(["grader", "eval_set"], sort=True):
        sheets[(str(grader), str(eval_set))] = {
            score: part.pivot(index="prompt_id", columns="run", values=score).sort_index().sort_index(axis=1)
            for score in SCORES
        }
    return sheets


def _score_stats(sheet: pd.DataFrame, runs: list[str], score: str, k: int) -> dict[str, float]:
    """`score` of `runs` (the mean over runs of each run's accuracy), its 95% interval over problems of the
    run-averaged per-problem scores, and its sample sd over runs (seeds); NaN where no run has the score."""
    nan = float("nan")
    scored = sheet[runs].dropna(axis=1, how="all")  # (P, runs with this score)
    per_problem = scored.mean(axis=1).dropna()  # (P,)
    if per_problem.empty:
        return {score: nan, f"{score}_lo": nan, f"{score}_hi": nan, f"{score}_sd": nan}
    mean, sd = mean_sd(scored.mean(axis=0).to_numpy())
    draws = (k if score == "mean@k" else 1) * scored.shape[1]  # 0/1 draws behind one problem's averaged score
    low, high = clustered_wilson_interval(per_problem.to_numpy(), draws)
    return {score: mean, f"{score}_lo": low, f"{score}_hi": high, f"{score}_sd": nan if sd is None else sd}


def _paired_stats(
    sheet: pd.DataFrame, meta: pd.DataFrame, runs: list[str], score: str, bootstrap_samples: int, seed: int
) -> dict[str, float]:
    """Paired difference of `runs` (one method x rank, or one run) to `BASELINE` on the same problems: each run
    minus the baseline runs of the same rank and seed (else of the same rank, else all of them), averaged over
    runs per problem, with a seeded bootstrap interval over problems. NaN for the baseline, the base model, or
    no shared problem."""
    key = f"{score}_vs_{BASELINE}"
    nan = {key: float("nan"), f"{key}_lo": float("nan"), f"{key}_hi": float("nan")}
    if meta.loc[runs[0], "method"] in (BASELINE, BASE_MODEL):
        return nan
    baseline = meta[meta["method"] == BASELINE]
    differences = []
    for run in runs:
        same_rank = baseline[baseline["rank"] == meta.loc[run, "rank"]]
        paired = same_rank[same_rank["seed"] == meta.loc[run, "seed"]]
        paired = paired if not paired.empty else same_rank if not same_rank.empty else baseline
        differences.append(sheet[run] - sheet[list(paired.index)].mean(axis=1))
    per_problem = pd.concat(differences, axis=1).mean(axis=1).dropna()  # (P,) sorted by prompt id
    if per_problem.empty:
        return nan
    low, high = paired_bootstrap_interval(per_problem.to_numpy(), samples=bootstrap_samples, seed=seed)
    return {key: float(per_problem.mean()), f"{key}_lo": low, f"{key}_hi": high}


def _accuracy_cell(row: pd.Series, score: str) -> str:
    if math.isnan(row[score]):
        return "n/a"
    if row["seeds"] >= 2:
        return f"{_fixed(row[score])} ± {_fixed(row[f'{score}_sd'])}"
    return f"{_fixed(row[score])} [{_fixed(row[f'{score}_lo'])}, {_fixed(row[f'{score}_hi'])}]"


def _difference_cell(row: pd.Series, score: str) -> str:
    if row["method"] == BASELINE:
        return "baseline"
    key = f"{score}_vs_{BASELINE}"
    if math.isnan(row[key]):
        return "n/a"
    low, high = _fixed(row[f"{key}_lo"], signed=True), _fixed(row[f"{key}_hi"], signed=True)
    return f"{_fixed(row[key], signed=True)} [{low}, {high}]"


def _fixed(value: float, signed: bool = False) -> str:
    """Three decimals, never "-0.000" (a bootstrap bound of -1e-17 is zero)."""
    value = round(float(value), 3) + 0.0
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def concentration_table(
    summary: pd.DataFrame, lineage: pd.DataFrame, noise: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per signal x rank x phase over normalized weights: mean over runs of the per-run trajectory
    means (Gini, ETR, top-5% mass, agnostic share), regime fractions and fallback rate, with lineage.

    With a non-empty `noise` (data/diagnostics/noise.parquet), two more columns mark noise-dominated signals:
    `noise_share` (mean over runs x checkpoints) and `noise_dominated` (yes / no / n/a, see NOISE_FOOTNOTE).
    """
    frame = summary[summary["over"] == "weight"].merge(lineage, on="run", how="left")
    agg = {f"{m}_mean": "mean" for m in CONCENTRATION_METRICS}
    agg |= {"frac_uniform": "mean", "frac_middle": "mean", "frac_concentrated": "mean", "fallback_rate": "mean"}
    out = frame.groupby(["signal", "rank", "phase"], sort=True).agg(agg).round(4).reset_index()
    out = out.rename(columns={f"{m}_mean": m for m in CONCENTRATION_METRICS})
    out = out.rename(columns={"top_k_mass": "top5%_mass"})
    if noise is not None and not noise.empty:
        share = noise.groupby(["signal", "rank", "phase"], sort=True)["noise_share"].mean().rename("noise_share")
        out = out.merge(share.reset_index(), on=["signal", "rank", "phase"], how="left")
        out["noise_share"] = out["noise_share"].round(4)
        out["noise_dominated"] = _dominated(out["noise_share"])
    lin = frame.groupby(["signal", "rank", "phase"], sort=True).apply(_lineage_cols, include_groups=False)
    return out.merge(lin.reset_index(), on=["signal", "rank", "phase"])


def noise_summary_table(noise: pd.DataFrame, lineage: pd.DataFrame) -> pd.DataFrame:
    """One row per signal x rank x phase of the low-precision runs: mean over runs x checkpoints of the noise
    share and rank correlation against float32 (SPEC 2b), how many of those checkpoints are noise-dominated,
    and the mean Gini / ETR of the weights from the run-dtype saliences next to those from the float32 ones,
    with lineage. Empty when `noise` is (every run is float32: write NO_LOW_PRECISION instead).

    Args:
        noise: data/diagnostics/noise.parquet (`arca.analysis.concentration.noise_table`).
        lineage: run, dump_md5.
    """
    keys = ["signal", "rank", "phase"]
    frame = noise.merge(lineage, on="run", how="left")
    out = frame.groupby(keys, sort=True).agg(
        checkpoints=("step", "size"),
        dominated_checkpoints=("noise_dominated", "sum"),  # the mean can hide one noisy run
        noise_share=("noise_share", "mean"),
        rank_corr=("rank_corr", "mean"),
        gini=("gini", "mean"),
        gini_fp32=("gini32", "mean"),
        etr=("etr", "mean"),
        etr_fp32=("etr32", "mean"),
    )
    out = out.round(4).reset_index()
    out["noise_dominated"] = _dominated(out["noise_share"])
    if out.empty:
        return out.reindex(columns=[*out.columns, "runs", "dump_md5"])
    lin = frame.groupby(keys, sort=True).apply(_lineage_cols, include_groups=False)
    return out.merge(lin.reset_index(), on=keys)


def _dominated(share: pd.Series) -> pd.Series:
    """yes / no by SPEC 2b's rule (noise share >= 1), n/a where the share was not measured."""
    return pd.Series(
        ["n/a" if math.isnan(s) else "yes" if s >= 1 else "no" for s in share], index=share.index, dtype=object
    )


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


SHORT_MD5 = 8  # hex digits of an md5 in a Markdown table: enough to find it in dvc.lock, short enough to read


def to_markdown(df: pd.DataFrame) -> str:
    """A Markdown table for people: every `*_md5` column shows `SHORT_MD5`-hex prefixes (`087581b5`; DVC's `.dir`
    suffix dropped), while the CSV and LaTeX files and dvc.lock keep the full hashes."""
    md5 = [str(c).endswith("_md5") for c in df.columns]
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = [
        "| " + " | ".join(short_md5s(v) if is_md5 else _cell(v) for v, is_md5 in zip(row, md5)) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body]) + "\n"


def short_md5s(value: object) -> str:
    """`a;b` of full md5s (or `none`) -> their `SHORT_MD5`-hex prefixes, `;`-joined; anything else as `_cell`."""
    if not isinstance(value, str) or not value:
        return _cell(value)
    parts = value.split(";")
    if not all(len(p.removesuffix(".dir")) == 32 or p == "none" for p in parts):
        return _cell(value)
    return ";".join(p if p == "none" else p[:SHORT_MD5] for p in parts)


def to_latex(df: pd.DataFrame, caption: str, note: str | None = None) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); lineage columns are left to the CSV. `note` is set
    in small type under the tabular (a footnote, or the one line that replaces an empty table)."""
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
    lines += ["\\bottomrule", "\\end{tabular}"]
    if note:
        lines.append(f"\\par\\smallskip{{\\footnotesize {_tex(note)}}}")
    lines.append("\\end{table}")
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
        ("Δ", "$\\Delta$"),
        ("@", "@"),
    ):
        text = text.replace(old, new)
    return text
