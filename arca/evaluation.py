"""Held-out accuracy of a model: pass@1 with greedy decoding and mean accuracy over k samples (SPEC 7)."""

from __future__ import annotations

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from arca.grading import math_reward
from arca.rollouts import generate


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: pd.DataFrame,
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    chat_template_kwargs: dict | None = None,
) -> pd.DataFrame:
    """One row per problem: prompt_id, eval_set, greedy (0/1), mean_k (mean reward over k samples),
    and the greedy completion text (for auditing).

    Args:
        problems: columns prompt_id, eval_set, prompt (chat messages), answer.
    """
    prompts = list(problems["prompt"])
    kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "chat_template_kwargs": chat_template_kwargs}
    greedy = generate(model, tokenizer, prompts, samples=1, greedy=True, **kwargs)
    answers = list(problems["answer"])
    greedy_reward = [math_reward(text, answers[i]) for i, text in zip(greedy.prompt_index.tolist(), greedy.texts)]
    mean_k = [0.0] * len(prompts)
    if k > 0:
        sampled = generate(
            model, tokenizer, prompts, samples=k, greedy=False, temperature=temperature, seed=seed, **kwargs
        )
        rewards = torch.tensor(
            [math_reward(text, answers[i]) for i, text in zip(sampled.prompt_index.tolist(), sampled.texts)]
        )
        mean_k = torch.zeros(len(prompts)).index_add_(0, sampled.prompt_index, rewards).div(k).tolist()
    return pd.DataFrame(
        {
            "prompt_id": problems["prompt_id"].to_numpy(),
            "eval_set": problems["eval_set"].to_numpy(),
            "greedy": greedy_reward,
            "mean_k": mean_k,
            "completion": greedy.texts,
        }
    )


def summarize(per_problem: pd.DataFrame, k: int) -> dict[str, dict[str, float]]:
    """eval_set -> {"pass@1": greedy accuracy, "mean@k": mean sampled accuracy, "n": problems}."""
    out = {}
    for name, group in per_problem.groupby("eval_set", sort=True):
        out[str(name)] = {
            "pass@1": round(float(group["greedy"].mean()), 6),
            f"mean@{k}": round(float(group["mean_k"].mean()), 6),
            "n": len(group),
        }
    return out
