"""Held-out accuracy of a model (SPEC 7): pass@1 with greedy decoding, and over k sampled completions per problem
the mean accuracy (mean@k) and pass@k (at least one of the k correct), each graded by every grader of
`arca.tasks.grading.GRADERS` (math-verify, and the ARCA paper's `exact`), so both papers' numbers sit side by side.

pass@k here is the plain "any of k correct" over exactly k samples: the unbiased estimator
`1 - C(n - c, k) / C(n, k)` that the paper's code calls reduces to it when n = k.
Intervals: `tables` adds 95% Wilson intervals (SPEC 7) and paired bootstrap differences from the per-problem
columns, which are kept for that.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pandas as pd
import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from arca.sampling.merged import merged_copy
from arca.sampling.rollouts import Rollouts, generate
from arca.tasks.grading import GRADERS

# grader name -> prefix of its columns and summary keys; math-verify keeps the historical unprefixed names.
PREFIXES = {"math_verify": "", "exact": "exact_"}


def evaluate(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    problems: pd.DataFrame,
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    chat_template_kwargs: dict | None = None,
    sample: Callable[..., Rollouts] | None = None,
    progress: str | None = None,
) -> pd.DataFrame:
    """One row per problem: prompt_id, eval_set; per grader (`PREFIXES`) `greedy` (0/1), `mean_k` (mean reward
    over k samples) and `pass_k` (1 if any of the k is correct); and the greedy completion text (for auditing).

    Args:
        problems: columns prompt_id, eval_set, prompt (chat messages or raw text), answer.
        k: samples per problem (0: greedy only; the k columns are then 0).
        temperature, top_p, top_k: sampling of the k completions (top_p 1 and top_k 0: unfiltered).
        sample: the engine, called as `sample(prompts, samples=..., greedy=..., ...)` with
            `arca.sampling.rollouts.generate`'s keywords (e.g. a bound `VLLMSampler.generate`); None: HF `generate`
            with `model` (then required; a `PeftModel` decodes as a merged copy, `arca.sampling.merged.merged_copy`).
        progress: the label of the HF decodes' progress bars (`<label>: greedy`, `<label>: sampled`;
            `arca.progress`); None: silent. A `sample` engine shows its own (vLLM's).
    """
    # the `progress` keyword is HF `generate`'s: a `sample` engine shows its own progress (vLLM's)
    labels = {"greedy": {}, "sampled": {}}
    if sample is None:
        if progress is not None:
            labels = {phase: {"progress": f"{progress}: {phase}"} for phase in labels}
        if model is None:
            raise ValueError("model: required when no `sample` engine is given")
        # HF decoding of an unmerged LoRA model is host-bound (two small matmuls per module per token): decode with
        # the adapter merged into a copy (`W + s B A`, the caller's model untouched; one copy of the weights).
        sample = partial(generate, merged_copy(model) if isinstance(model, PeftModel) else model, tokenizer)
    prompts = list(problems["prompt"])
    answers = list(problems["answer"])
    kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "chat_template_kwargs": chat_template_kwargs}
    greedy = sample(prompts, samples=1, greedy=True, **kwargs, **labels["greedy"])
    sampled = None
    if k > 0:
        sampled = sample(
            prompts,
            samples=k,
            greedy=False,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            **kwargs,
            **labels["sampled"],
        )
    columns: dict[str, object] = {
        "prompt_id": problems["prompt_id"].to_numpy(),
        "eval_set": problems["eval_set"].to_numpy(),
    }
    for name, prefix in PREFIXES.items():
        grade = GRADERS[name]
        columns[f"{prefix}greedy"] = [grade(t, answers[i]) for i, t in zip(greedy.prompt_index.tolist(), greedy.texts)]
        mean_k, pass_k = [0.0] * len(prompts), [0.0] * len(prompts)
        if sampled is not None:
            rewards = torch.tensor([grade(t, answers[i]) for i, t in zip(sampled.prompt_index.tolist(), sampled.texts)])
            per_problem = torch.zeros(len(prompts)).index_add_(0, sampled.prompt_index, rewards)  # (P,) correct
            mean_k, pass_k = per_problem.div(k).tolist(), (per_problem > 0).float().tolist()
        columns[f"{prefix}mean_k"], columns[f"{prefix}pass_k"] = mean_k, pass_k
    columns["completion"] = greedy.texts
    return pd.DataFrame(columns)


def summarize(per_problem: pd.DataFrame, k: int) -> dict[str, dict[str, float]]:
    """eval_set -> {"pass@1": greedy accuracy, "mean@k": mean sampled accuracy, "pass_at_k": share of problems
    with a correct sample, the same three prefixed `exact_` for the paper's grader, "n": problems}."""
    out = {}
    for name, group in per_problem.groupby("eval_set", sort=True):
        stats: dict[str, float] = {}
        for prefix in PREFIXES.values():
            stats[f"{prefix}pass@1"] = round(float(group[f"{prefix}greedy"].mean()), 6)
            stats[f"{prefix}mean@{k}"] = round(float(group[f"{prefix}mean_k"].mean()), 6)
            stats[f"{prefix}pass_at_k"] = round(float(group[f"{prefix}pass_k"].mean()), 6)
        out[str(name)] = {**stats, "n": len(group)}
    return out
