"""The model side of `arca inspect` (`arca.inspect.report` calls it once every input is checked): load base +
adapter, sample, compute the signals with the dump stage's own functions, grade, and write the four outputs."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd
import torch

from arca.analysis.concentration import dump_signals, trajectory_table
from arca.analysis.explorer import write_explorer
from arca.analysis.faithfulness import completion_scores, summarize
from arca.analysis.faithfulness_table import FAITHFULNESS_FOOTNOTE, faithfulness_cells
from arca.analysis.tables import concentration_table, to_markdown
from arca.credit.config import CreditConfig
from arca.credit.diagnostics import aggregate
from arca.credit.signals import SIGNAL_NAMES
from arca.inspect.report import (
    FORMATTING_TOKENS,
    UNKNOWN_METHOD,
    UNKNOWN_SEED,
    Checked,
    InspectSettings,
    prompts_of,
    settings_md5,
)
from arca.io import write_parquet, write_text
from arca.models.base import resolve_dtype
from arca.sampling.counterfactual import effects_frame, probes_from_dump, token_effects
from arca.sampling.dump import a32_signals, dump_schema, float32_saliences, signal_weights, token_table
from arca.sampling.rollouts import eos_token_ids, generate
from arca.tasks.grading import GRADERS

log = logging.getLogger("arca.inspect")
CREDIT = CreditConfig(method="arca")  # SPEC 3's defaults; `method` does not enter the normalization


def load_policy(settings: InspectSettings, base):
    """Base model (in `settings.dtype`, on the GPU when there is one) wrapped with the adapter, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.folder or base.name, dtype=resolve_dtype(settings.dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return PeftModel.from_pretrained(model.eval(), settings.adapter, is_trainable=False).eval()


def write_outputs(settings: InspectSettings, checked: Checked, model, tokenizer, chat: bool) -> dict[str, Path]:
    out = Path(settings.out)
    tokens = token_rows(settings, checked, model, tokenizer, chat)
    paths = {"tokens": out / "tokens.parquet", "concentration": out / "concentration.md"}
    dtype = next(model.parameters()).dtype
    schema = dump_schema(SIGNAL_NAMES, a32_signals(dtype, SIGNAL_NAMES))
    metadata = {
        "arca.schema": str(schema),
        "arca.params_md5": settings_md5(settings),
        "arca.run": checked.run,
        "arca.dtype": str(dtype).removeprefix("torch."),
        "arca.a32_signals": ",".join(a32_signals(dtype, SIGNAL_NAMES)),
        "arca.engine": "hf",
        "arca.base": settings.base,
        "arca.adapter": str(settings.adapter),
    }
    write_parquet(paths["tokens"], tokens, schema=schema, metadata=metadata)
    md5 = hashlib.md5(paths["tokens"].read_bytes()).hexdigest()
    write_text(paths["concentration"], concentration_markdown(tokens, md5, settings))
    effects = None
    answered = set(checked.problems.loc[checked.problems["answer"].notna(), "prompt_id"])
    if settings.faithfulness and answered:
        effects = token_effects_table(settings, checked, model, tokenizer, chat, tokens, answered)
        paths |= {"effects": out / "effects.parquet", "faithfulness": out / "faithfulness.md"}
        write_parquet(paths["effects"], effects, metadata={"arca.run": checked.run, "arca.dump_md5": md5})
        write_text(paths["faithfulness"], faithfulness_markdown(tokens, effects, answered, settings))
    else:  # an earlier inspection's SPEC 9 files in the same --out would read as this one's
        for name in ("effects.parquet", "faithfulness.md"):
            (out / name).unlink(missing_ok=True)
    paths["explorer"] = write_explorer(
        out / "explorer.html",
        tokens,
        effects=effects,
        problems=checked.problems,
        title=f"ARCA token explorer: {checked.run}",
    )
    for name, path in paths.items():
        log.info("wrote %s: %s", name, path)
    return paths


def token_rows(settings: InspectSettings, checked: Checked, model, tokenizer, chat: bool) -> pd.DataFrame:
    """The SPEC 6 table of K sampled completions per prompt, as the dump stage computes it (`stages.dump`)."""
    problems = checked.problems
    rollouts = generate(
        model,
        tokenizer,
        prompts_of(problems, chat),
        samples=settings.samples,
        greedy=False,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=settings.seed,
        batch_size=settings.batch_size,
        progress="inspect: sampling",
    )
    grade, answers = GRADERS[settings.grader], problems["answer"].tolist()
    prompt_index = rollouts.prompt_index.tolist()
    rewards = torch.tensor(  # no answer: no reward, and no advantage (NaN)
        [float("nan") if pd.isna(answers[i]) else grade(t, answers[i]) for i, t in zip(prompt_index, rollouts.texts)]
    )
    args = (settings.batch_size, settings.temperature)
    weights = signal_weights(model, rollouts, CREDIT, SIGNAL_NAMES, *args, progress="inspect: signals")
    dtype = next(model.parameters()).dtype
    a32 = float32_saliences(model, rollouts, a32_signals(dtype), CREDIT.layer, *args, progress="inspect: float32")
    meta = {"run": checked.run, "method": UNKNOWN_METHOD, "rank": checked.adapter.rank, "seed": UNKNOWN_SEED}
    meta["step"] = checked.step
    table = token_table(rollouts, tokenizer, problems["prompt_id"].tolist(), rewards, weights, meta, a32)
    log.info("%d completions, %d tokens, mean reward %.3f", len(rollouts.texts), len(table), rewards.nanmean())
    return table


def concentration_markdown(tokens: pd.DataFrame, md5: str, settings: InspectSettings) -> str:
    """SPEC 5 per signal over the normalized weights, as the diagnose and tables stages compute it."""
    signals = dump_signals(tokens.columns)
    traj = trajectory_table(tokens, signals, FORMATTING_TOKENS, eps=CREDIT.eps, sharpening=CREDIT.sharpening)
    keys = ["run", "step", "signal", "over"]
    fallback = traj.groupby(keys, sort=True)["fallback"].mean().rename("fallback_rate").reset_index()
    summary = aggregate(traj, ["run", "method", "rank", "seed", "step", "phase", "signal", "over"]).merge(fallback)
    table = concentration_table(summary, pd.DataFrame({"run": [tokens["run"].iat[0]], "dump_md5": [md5]}))
    table = table.drop(columns="phase")  # one checkpoint, whose step an adapter may not record (0 is not init)
    return (
        f"# Credit concentration (SPEC 5): {settings.adapter} on {settings.base}\n\n"
        f"{traj['prompt_id'].nunique()} prompts x {settings.samples} samples; every signal normalized with SPEC 3's "
        "defaults (mean scheme, no sharpening); means over trajectories of the normalized weights. "
        "Regimes: uniform if ETR >= 0.95, concentrated if ETR <= 0.25. fallback_rate: share of trajectories "
        "whose salience was degenerate (weights fell back to uniform).\n\n" + to_markdown(table)
    )


def token_effects_table(
    settings: InspectSettings, checked: Checked, model, tokenizer, chat: bool, tokens: pd.DataFrame, answered: set
) -> pd.DataFrame:
    """SPEC 9's counterfactual effects on the completions of the prompts that have an answer."""
    problems = checked.problems[checked.problems["prompt_id"].isin(answered)]
    keys, probes = probes_from_dump(
        tokenizer,
        tokens[tokens["prompt_id"].isin(answered)],
        dict(zip(problems["prompt_id"], prompts_of(problems, chat))),
        dict(zip(problems["prompt_id"], problems["answer"])),
        max_positions=settings.max_positions,
        seed=settings.seed,
    )
    rows = token_effects(
        model,
        tokenizer,
        probes,
        GRADERS[settings.grader],
        max_completion_length=settings.max_new_tokens,
        eos_ids=eos_token_ids(model.generation_config, tokenizer),
        batch_size=settings.batch_size,
        progress="inspect: counterfactual decodes",
    )
    effects = effects_frame(keys, rows, checked.run, checked.step)
    log.info("%d scored positions, %d decisive", len(effects), int(effects["decisive"].sum()))
    return effects


def faithfulness_markdown(tokens: pd.DataFrame, effects: pd.DataFrame, answered: set, settings: InspectSettings) -> str:
    """SPEC 9's table: every signal and its permutation control, as the faithfulness and tables stages write it."""
    rows = tokens[tokens["prompt_id"].isin(answered)]
    run, step = rows["run"].iat[0], int(rows["step"].iat[0])
    scores = completion_scores(rows, effects, dump_signals(tokens.columns), seed=settings.seed)
    summary = summarize(scores.assign(run=run, step=step), seed=settings.seed)
    return (
        f"# Counterfactual faithfulness (SPEC 9): {settings.adapter} on {settings.base}\n\n"
        f"{FAITHFULNESS_FOOTNOTE}\n\n" + to_markdown(faithfulness_cells(summary))
    )
