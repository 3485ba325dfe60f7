"""The model side of the degeneration map (SPEC 10): fixed probe rollouts rebuilt from a dump, teacher-forced
under `pi_c` (arca.sampling.scaling) for every scale `c`, every signal's raw saliences in one dtype.

Why not `arca.credit.signals.compute_signals` per scale: its adapter-off pass does not depend on `c`, so it runs once
per batch here and every scale adds only its adapter-on pass (7 scales: 8 passes instead of 14). The states go
through the same `signals_from_states`, so at `c = 1` the saliences equal `compute_signals`' bit for bit; `c = 0`
is the reference itself (no pass at all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import pandas as pd
import torch
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from arca.credit.lora_local import capture_lora_norms
from arca.credit.signals import needs_lora, signals_from_states
from arca.credit.vocab import logit_map
from arca.sampling.rollouts import Prompt, Rollouts, prompt_texts
from arca.sampling.scaling import scaled_adapter

COMPLETION_KEYS = ["prompt_id", "sample"]


def rollouts_from_dump(
    tokenizer: PreTrainedTokenizerBase,
    rows: pd.DataFrame,
    prompts: Mapping[str, Prompt],
    chat_template_kwargs: dict | None = None,
) -> tuple[Rollouts, pd.DataFrame]:
    """The completions of one run and step of a dump (SPEC 6 rows) as `Rollouts`: each prompt tokenized as
    generation tokenized it (`arca.sampling.rollouts.prompt_texts`), left-padded to P, the dumped token ids (every valid
    token, EOS included) right-padded to C, completion mask 1 exactly on the dumped tokens.

    Args:
        rows: dump rows of one step (prompt_id, sample, pos, token_id); any order.
        prompts: prompt_id -> the prompt as data/prepared/probe.parquet holds it.
    Returns:
        (rollouts, rows sorted by prompt_id, sample, pos: the order of the rollouts' valid tokens, row-major).
    """
    if rows["step"].nunique() != 1:
        raise ValueError(f"rows: one step expected, got steps {sorted(rows['step'].unique().tolist())}")
    missing = sorted(set(rows["prompt_id"]) - set(prompts))
    if missing:
        raise ValueError(f"rows: prompt ids {missing[:3]} are not in the probe prompts; rerun prepare and dump")
    rows = rows.sort_values([*COMPLETION_KEYS, "pos"], kind="stable").reset_index(drop=True)
    ids = sorted(rows["prompt_id"].unique())
    texts, special = prompt_texts(tokenizer, [prompts[p] for p in ids], chat_template_kwargs)
    prompt_ids = dict(zip(ids, tokenizer(texts, add_special_tokens=special)["input_ids"]))
    groups = list(rows.groupby(COMPLETION_KEYS, sort=True)["token_id"])
    width_p = max(len(prompt_ids[key[0]]) for key, _ in groups)
    width_c = max(len(tokens) for _, tokens in groups)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(groups)
    input_ids = torch.full((n, width_p + width_c), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    for i, ((prompt_id, _), tokens) in enumerate(groups):
        prompt = prompt_ids[prompt_id]
        input_ids[i, width_p - len(prompt) : width_p] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, width_p : width_p + len(tokens)] = torch.tensor(tokens.to_numpy(), dtype=torch.long)
        attention[i, width_p - len(prompt) : width_p + len(tokens)] = 1
        completion[i, width_p : width_p + len(tokens)] = 1
    rollouts = Rollouts(
        input_ids=input_ids,
        attention_mask=attention,
        completion_mask=completion,
        prompt_index=torch.tensor([ids.index(key[0]) for key, _ in groups]),
        sample=torch.tensor([int(key[1]) for key, _ in groups]),
        prompt_length=width_p,
        texts=[""] * n,  # not needed: rewards come from the dump
    )
    return rollouts, rows


def _states(model: torch.nn.Module, ids: Tensor, attn: Tensor, layer: int) -> tuple[Tensor, Tensor | None]:
    """(final hidden state, state at `layer` or None when that is the final one), each (b, L - 1, H): the
    positions that predict tokens 1 .. L - 1."""
    hidden = model(
        input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False, logits_to_keep=1
    ).hidden_states  # (num_layers + 1) x (b, L, H)
    if not -len(hidden) <= layer < len(hidden):
        raise ValueError(f"layer: {layer} is out of range for {len(hidden)} hidden states")
    at_layer = None if layer % len(hidden) == len(hidden) - 1 else hidden[layer][:, :-1]
    return hidden[-1][:, :-1], at_layer


@torch.no_grad()
def scaled_saliences(
    model: PeftModel,
    rollouts: Rollouts,
    scales: Sequence[float],
    signals: Sequence[str],
    *,
    layer: int = -1,
    batch_size: int = 8,
    temperature: float = 1.0,
) -> dict[float, dict[str, Tensor]]:
    """scale c -> signal -> (N, C) float32 raw saliences under `pi_c` (0 on padding), in the model's current
    dtype: one adapter-off pass per batch shared by every scale, one adapter-on pass per scale c > 0, no dropout.

    Args:
        model: base + LoRA (`peft.PeftModel`); every module's train/eval mode is restored afterwards.
        rollouts: the fixed tokens (`rollouts_from_dump`); scales: the `c` values, each >= 0.
        signals: registered signal names; layer, temperature: as in `arca.credit.signals.compute_signals`.
    """
    if not isinstance(model, PeftModel):
        raise ValueError("model: the degeneration map scales a LoRA adapter; pass a peft.PeftModel")
    p, device = rollouts.prompt_length, next(model.parameters()).device
    use_lora = needs_lora(signals)
    out: dict[float, dict[str, list[Tensor]]] = {c: {s: [] for s in signals} for c in scales}
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for start in range(0, rollouts.input_ids.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            ids, attn = rollouts.input_ids[sl].to(device), rollouts.attention_mask[sl].to(device)
            mask = (rollouts.completion_mask[sl, 1:].to(device) != 0) & (attn[:, 1:] != 0)  # (b, L - 1)
            with model.disable_adapter():
                ref = _states(model, ids, attn, layer)
            for c in scales:
                if c == 0:  # pi_0 is the reference bit for bit (tests/sampling/test_scaling.py): no pass or LoRA output
                    policy = ref
                    norms = torch.zeros(mask.shape, dtype=torch.float32, device=device) if use_lora else None
                else:
                    capture = capture_lora_norms(model, ids.shape[1] - 1) if use_lora else nullcontext()
                    with scaled_adapter(model, c), capture as cap:
                        policy = _states(model, ids, attn, layer)
                    norms = cap.norms() if use_lora else None  # (b, L - 1)
                raw = signals_from_states(
                    ids[:, 1:], mask, policy[0], model.get_output_embeddings(), ref[0],
                    policy_arca_hidden=policy[1], ref_arca_hidden=ref[1], lora_norms=norms,
                    to_logits=logit_map(model), names=signals, temperature=temperature,
                )  # fmt: skip
                for name in signals:  # position j - 1 scores token j: pad one column back, keep the completion
                    out[c][name].append(torch.nn.functional.pad(raw[name], (1, 0))[:, p:].float().cpu())
    finally:
        for module, training in modes.items():
            module.training = training
    return {c: {name: torch.cat(parts) for name, parts in per.items()} for c, per in out.items()}


def token_frame(rows: pd.DataFrame, rollouts: Rollouts, weights: Mapping[str, tuple[Tensor, Tensor]]) -> pd.DataFrame:
    """`rows` (sorted as `rollouts_from_dump` returns them) with every `a_<s>`, `w_<s>` column replaced by the
    (N, C) values of `weights` (name -> (raw, normalized)) at the valid tokens, in row-major order."""
    mask = rollouts.completion_mask[:, rollouts.prompt_length :].bool()  # (N, C)
    row, pos = mask.nonzero(as_tuple=True)
    if len(row) != len(rows):
        raise ValueError(f"rows: {len(rows)} rows for {len(row)} valid tokens; pass the rows rollouts_from_dump sorted")
    keep = [c for c in rows.columns if not c.startswith(("a_", "w_", "a32_"))]
    data = {f"{kind}_{name}": v[row, pos].numpy() for name, pair in weights.items() for kind, v in zip("aw", pair)}
    return pd.concat([rows[keep].reset_index(drop=True), pd.DataFrame(data)], axis=1)
