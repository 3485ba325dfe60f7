"""Per-token credit dumps (SPEC section 6): every signal, raw and normalized, on the same probe rollouts,
whatever method the run was trained with, so signals can be compared token by token."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from arca.credit import normalize
from arca.credit_config import CreditConfig
from arca.rollouts import Rollouts
from arca.signals import SIGNAL_NAMES, compute_signals


def dump_schema(signals: Sequence[str] = SIGNAL_NAMES) -> pa.Schema:
    """The Parquet schema of SPEC section 6, column order included."""
    fields = [
        ("run", pa.string()),
        ("method", pa.string()),
        ("rank", pa.int32()),
        ("seed", pa.int32()),
        ("step", pa.int32()),
        ("prompt_id", pa.string()),
        ("sample", pa.int32()),
        ("pos", pa.int32()),
        ("token_id", pa.int32()),
        ("token", pa.string()),
        ("reward", pa.float32()),
        ("advantage", pa.float32()),
    ]
    for name in signals:
        fields += [(f"a_{name}", pa.float32()), (f"w_{name}", pa.float32())]
    return pa.schema(fields)


def group_advantages(rewards: Tensor, groups: Tensor) -> Tensor:
    """TRL's group-normalized advantage `(r - mean_g) / (std_g + 1e-4)`, std unbiased as in TRL.

    Args:
        rewards: (N,) float; groups: (N,) long prompt index.
    """
    adv = torch.zeros_like(rewards)
    for g in torch.unique(groups):
        idx = groups == g
        r = rewards[idx]
        std = r.std() if r.numel() > 1 else torch.tensor(0.0)
        adv[idx] = (r - r.mean()) / (std + 1e-4)
    return adv


def signal_weights(
    model: torch.nn.Module,
    rollouts: Rollouts,
    credit: CreditConfig,
    signals: Sequence[str],
    batch_size: int = 8,
    temperature: float = 1.0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (raw saliences, normalized weights), each (N, C) over completion positions."""
    out: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in signals}
    p = rollouts.prompt_length
    for start in range(0, rollouts.input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        device = next(model.parameters()).device
        raw = compute_signals(
            model,
            rollouts.input_ids[sl].to(device),
            rollouts.attention_mask[sl].to(device),
            rollouts.completion_mask[sl].to(device),
            layer=credit.layer,
            names=signals,
            temperature=temperature,  # the sampling temperature, as TRL's log-probs and the trainer use
        )
        mask = rollouts.completion_mask[sl, p:]  # (b, C)
        for name in signals:
            a = raw[name][:, p:].float().cpu()  # (b, C)
            w, _ = normalize(
                a,
                mask,
                credit.scheme,
                credit.tau,
                credit.eps,
                mix=credit.mix,
                w_max=credit.w_max,
                sharpening=credit.sharpening,
            )
            out[name].append((a, w))
    return {name: (torch.cat([a for a, _ in v]), torch.cat([w for _, w in v])) for name, v in out.items()}


def token_table(
    rollouts: Rollouts,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[str],
    rewards: Tensor,
    weights: dict[str, tuple[Tensor, Tensor]],
    meta: dict[str, object],
) -> pd.DataFrame:
    """Flatten to one row per valid completion token, ordered (prompt_id, sample, pos).

    `meta` holds run, method, rank, seed, step. `advantage` is the sequence-level group-normalized
    advantage A_i (the per-token advantage of a method is A_i * w_<method>).
    """
    p = rollouts.prompt_length
    mask = rollouts.completion_mask[:, p:].bool()  # (N, C)
    ids = rollouts.input_ids[:, p:]  # (N, C)
    row, pos = mask.nonzero(as_tuple=True)
    token_ids = ids[row, pos].numpy()
    vocab = {int(t): tokenizer.decode([int(t)]) for t in np.unique(token_ids)}
    adv = group_advantages(rewards.float(), rollouts.prompt_index)
    data: dict[str, object] = {
        "run": meta["run"],
        "method": meta["method"],
        "rank": meta["rank"],
        "seed": meta["seed"],
        "step": meta["step"],
        "prompt_id": np.asarray(prompt_ids, dtype=object)[rollouts.prompt_index[row].numpy()],
        "sample": rollouts.sample[row].numpy(),
        "pos": pos.numpy(),
        "token_id": token_ids,
        "token": [vocab[int(t)] for t in token_ids],
        "reward": rewards[row].numpy(),
        "advantage": adv[row].numpy(),
    }
    for name, (a, w) in weights.items():
        data[f"a_{name}"] = a[row, pos].numpy()
        data[f"w_{name}"] = w[row, pos].numpy()
    df = pd.DataFrame(data)
    df = df.sort_values(["prompt_id", "sample", "pos"], kind="stable").reset_index(drop=True)
    schema = dump_schema(list(weights))
    return df.astype({f.name: _pandas_dtype(f.type) for f in schema})


def _pandas_dtype(t: pa.DataType) -> str:
    return {pa.int32(): "int32", pa.float32(): "float32"}.get(t, "object")
