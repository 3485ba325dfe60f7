"""Counterfactual token effects (SPEC 9): for a completion y of prompt x and a position t, decode the rest
greedily from y_1..y_t (control) and from y_1..y_t-1 y'_t (intervention, y'_t the most likely other token),
grade both with the training grader; `effect = r0 - r1`, and t is decisive iff the effect is non-zero.

Both decodes stay inside the run's completion budget: `max_completion_length` tokens in all, the kept prefix
included, and both stop at the first EOS (an EOS as y'_t ends the completion there). Decodes run in batches,
left-padded, `model.generate` doing the token loop; sorting the rows by their remaining budget keeps batches
from generating far past what their rows can keep. Greedy decoding is deterministic, so a row's continuation
does not depend on its batch (up to floating-point ties under padding, as in any batched decode).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from arca.progress import progress as progress_bar
from arca.sampling.rollouts import Prompt, completion_mask_from_ids, prompt_texts

# The effects table (`effects_frame`): one row per scored position, these columns typed so.
EFFECT_TYPES = {
    "step": "int32",
    "sample": "int32",
    "pos": "int32",
    "token_id": "int32",
    "alt_token_id": "int32",
    "r0": "float32",
    "r1": "float32",
    "effect": "float32",
    "decisive": "bool",
    "control_tokens": "int32",
    "intervention_tokens": "int32",
}
EFFECT_COLUMNS = ["probe", "pos", "token_id", "alt_token_id", "r0", "r1", "effect", "decisive"]
EFFECT_COLUMNS += ["control_tokens", "intervention_tokens"]  # a `token_effects` row


@dataclass(frozen=True)
class Probe:
    """One completion to probe: its prompt's token ids, its completion's token ids (valid tokens, EOS
    included when it has one), the reference answer, and the positions to score (0-based, ascending)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    answer: str
    positions: list[int]


def choose_positions(length: int, max_positions: int, seed: int, prompt_id: str, sample: int, step: int) -> list[int]:
    """Every position of a `length`-token completion when length <= max_positions, else a sample of
    `max_positions` without replacement from a generator seeded by (seed, step, prompt_id, sample), so the
    choice does not depend on which other completions are scored. Sorted ascending."""
    if length <= max_positions:
        return list(range(length))
    rng = np.random.default_rng([seed, step, zlib.crc32(prompt_id.encode()), sample])
    return sorted(rng.choice(length, size=max_positions, replace=False).tolist())


@torch.no_grad()
def alternative_tokens(
    model: PreTrainedModel, probes: Sequence[Probe], pad_id: int, batch_size: int
) -> list[list[int]]:
    """Per probe and scored position t, y'_t = argmax over v != y_t of pi_theta(v | x, y_<t) (ties: lowest id,
    as torch.argmax returns the first maximum; EOS allowed). One teacher-forced pass per batch: hidden states
    at the positions that predict the scored tokens, through the output layer there only, never (B, L, V)
    logits. Logit scaling and soft-capping are monotone, so they cannot change an argmax and are skipped."""
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(probes), batch_size):
        batch = probes[start : start + batch_size]
        ids, attn = left_pad([p.prompt_ids + p.completion_ids for p in batch], pad_id)  # (b, L)
        hidden = model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        ).hidden_states[-1]  # (b, L, H)
        width = ids.shape[1]
        rows = [i for i, p in enumerate(batch) for _ in p.positions]
        # the state at prompt_len + t - 1 predicts y_t; padding sits on the left
        cols = [width - len(p.completion_ids) + t - 1 for p in batch for t in p.positions]
        targets = torch.tensor([p.completion_ids[t] for p in batch for t in p.positions], device=device)
        logits = head(hidden[rows, cols]).float()  # (K, V)
        logits[torch.arange(len(rows), device=device), targets] = -torch.inf  # any token but y_t
        best = logits.argmax(dim=-1).tolist()
        for p in batch:
            out.append(best[: len(p.positions)])
            best = best[len(p.positions) :]
    return out


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, attention_mask), each (B, L) long, every sequence left-padded to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            attn[i, width - len(seq) :] = 1
    return ids, attn


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    prefixes: Sequence[list[int]],
    *,
    max_completion_length: int,
    eos_ids: Sequence[int],
    pad_id: int,
    batch_size: int,
    progress: str | None = None,
) -> list[list[int]]:
    """Complete each prefix greedily: the completion tokens (prefix + continuation, up to and including the
    first EOS, at most `max_completion_length` in all). A prefix that already ends in EOS or fills the
    budget is returned as it is, without a decode.

    Args:
        prompts: per row, the prompt's token ids; prefixes: per row, the kept completion tokens (>= 1).
        progress: the label of a progress bar over the decodes (`arca.progress`); None: silent.
    """
    budget = [max_completion_length - len(p) for p in prefixes]
    done = [b <= 0 or p[-1] in eos_ids for p, b in zip(prefixes, budget)]
    out = [list(p[:max_completion_length]) for p in prefixes]
    todo = sorted((i for i in range(len(prefixes)) if not done[i]), key=lambda i: (-budget[i], i))
    device = next(model.parameters()).device
    with progress_bar(total=len(todo), desc=progress, unit="decode") as bar:
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            _decode_batch(model, rows, prompts, prefixes, budget, out, eos_ids=eos_ids, pad_id=pad_id, device=device)
            bar.update(len(rows))
    return out


def _decode_batch(
    model: PreTrainedModel,
    rows: Sequence[int],
    prompts: Sequence[list[int]],
    prefixes: Sequence[list[int]],
    budget: Sequence[int],
    out: list[list[int]],
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    device: torch.device,
) -> None:
    """One left-padded greedy `generate` over `rows`; appends each row's continuation (up to its first EOS, within
    its budget) to `out[row]`."""
    ids, attn = left_pad([prompts[i] + prefixes[i] for i in rows], pad_id)
    generated = model.generate(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max(budget[i] for i in rows),
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids),
    )[:, ids.shape[1] :].cpu()  # (b, new)
    keep = completion_mask_from_ids(generated, eos_ids).bool()  # (b, new): up to the first EOS
    for j, i in enumerate(rows):
        out[i] = out[i] + generated[j][keep[j]][: budget[i]].tolist()


def token_effects(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[Probe],
    grade: Callable[[str, str], float],
    *,
    max_completion_length: int,
    eos_ids: Sequence[int],
    batch_size: int = 16,
    progress: str | None = None,
) -> list[dict[str, object]]:
    """Per probe and scored position: {probe, pos, token_id, alt_token_id, r0, r1, effect, decisive,
    control_tokens, intervention_tokens} (rows in probe then position order).

    Args:
        model: the checkpoint's policy (base + adapter), in eval mode; its greedy decodes make both branches.
        probes: the completions to probe; grade: the training grader (completion text, answer) -> reward.
        max_completion_length: the run's completion budget (train.max_completion_length).
        eos_ids: the ids that end a completion (`arca.sampling.rollouts.eos_token_ids`).
        progress: the label of a progress bar over the greedy decodes (`arca.progress`); None: silent.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    was_training = model.training
    model.eval()
    try:
        alternatives = alternative_tokens(model, probes, pad_id, batch_size)
        cells = [(k, t, alt) for k, p in enumerate(probes) for t, alt in zip(p.positions, alternatives[k])]
        prompts = [probes[k].prompt_ids for k, _, _ in cells]
        control = [probes[k].completion_ids[: t + 1] for k, t, _ in cells]
        intervention = [[*probes[k].completion_ids[:t], alt] for k, t, alt in cells]
        decoded = greedy_continuations(
            model,
            prompts + prompts,
            control + intervention,
            max_completion_length=max_completion_length,
            eos_ids=eos_ids,
            pad_id=pad_id,
            batch_size=batch_size,
            progress=progress,
        )
    finally:
        model.train(was_training)
    rows = []
    for c, (k, t, alt) in enumerate(cells):
        kept, changed = decoded[c], decoded[len(cells) + c]
        r0 = grade(tokenizer.decode(kept, skip_special_tokens=True), probes[k].answer)
        r1 = grade(tokenizer.decode(changed, skip_special_tokens=True), probes[k].answer)
        rows.append(
            {
                "probe": k,
                "pos": t,
                "token_id": probes[k].completion_ids[t],
                "alt_token_id": alt,
                "r0": float(r0),
                "r1": float(r1),
                "effect": float(r0 - r1),
                "decisive": r0 != r1,
                "control_tokens": len(kept),
                "intervention_tokens": len(changed),
            }
        )
    return rows


def probes_from_dump(
    tokenizer: PreTrainedTokenizerBase,
    dump: pd.DataFrame,
    prompts: dict[str, Prompt],
    answers: dict[str, str],
    *,
    max_positions: int,
    seed: int,
    chat_template_kwargs: dict | None = None,
) -> tuple[pd.DataFrame, list[Probe]]:
    """The completions of one run and step of a dump (SPEC 6 rows: prompt_id, sample, step, pos, token_id) as
    `Probe`s, with the prompt tokenized exactly as generation tokenized it (`arca.sampling.rollouts.prompt_texts`).

    Returns:
        keys (prompt_id, sample per probe, sorted) and the probes in that order.
    """
    steps = dump["step"].unique()
    if len(steps) != 1:
        raise ValueError(f"dump: rows of one step expected, got steps {sorted(steps.tolist())}")
    missing = sorted(set(dump["prompt_id"]) - set(prompts))
    if missing:
        raise ValueError(f"prompts: no probe prompt for prompt_id {missing[:3]}; rerun prepare and dump")
    ids = sorted(set(dump["prompt_id"]))
    texts, special = prompt_texts(tokenizer, [prompts[i] for i in ids], chat_template_kwargs)
    prompt_ids = dict(zip(ids, tokenizer(texts, add_special_tokens=special)["input_ids"]))
    rows = dump.sort_values(["prompt_id", "sample", "pos"], kind="stable")
    keys, probes = [], []
    for (prompt_id, sample), part in rows.groupby(["prompt_id", "sample"], sort=True):
        tokens = part["token_id"].astype(int).tolist()
        positions = choose_positions(len(tokens), max_positions, seed, str(prompt_id), int(sample), int(steps[0]))
        keys.append({"prompt_id": prompt_id, "sample": int(sample)})
        probes.append(Probe(list(prompt_ids[prompt_id]), tokens, answers[prompt_id], positions))
    return pd.DataFrame(keys, columns=["prompt_id", "sample"]), probes


def effects_frame(keys: pd.DataFrame, rows: Sequence[dict[str, object]], run: str, step: int) -> pd.DataFrame:
    """The effects table of one checkpoint: `token_effects` rows with their completion's prompt_id and sample (from
    `probes_from_dump`'s keys) in place of the probe index, and the run and step first; typed as `EFFECT_TYPES`.
    Rows sorted by prompt_id, sample, pos, as the keys and probes are."""
    frame = pd.DataFrame(list(rows), columns=EFFECT_COLUMNS)
    frame = pd.concat([keys.iloc[frame.pop("probe")].reset_index(drop=True), frame], axis=1)
    frame.insert(0, "step", step)
    frame.insert(0, "run", run)
    return frame.astype(EFFECT_TYPES)
