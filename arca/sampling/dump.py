"""Per-token credit dumps (SPEC section 6): every signal, raw and normalized, on the same probe rollouts,
whatever method the run was trained with, so signals can be compared token by token.

A run whose dtype is not float32 also gets `a32_<s>` columns (SPEC 2b): every precision-sensitive signal
recomputed with the weights upcast to float32 on the same rollouts and checkpoint, so the diagnostics can
tell signal from rounding noise. A float32 run has no `a32_` columns (its `a_` already is the float32 value).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from arca.credit.config import CreditConfig
from arca.credit.normalize import normalize
from arca.credit.precision import float32_weights
from arca.credit.signals import SIGNAL_NAMES, compute_signals, precision_sensitive
from arca.progress import progress as progress_bar
from arca.sampling.rollouts import Rollouts


def dump_schema(signals: Sequence[str] = SIGNAL_NAMES, float32_signals: Sequence[str] = ()) -> pa.Schema:
    """The Parquet schema of SPEC section 6, column order included.

    Args:
        signals: every signal with an `a_<s>` / `w_<s>` pair, in this order.
        float32_signals: signals with an `a32_<s>` column after the pairs (see `a32_signals`); empty for a
            float32 run.
    """
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
    fields += [(f"a32_{name}", pa.float32()) for name in float32_signals]
    return pa.schema(fields)


def a32_signals(dtype: torch.dtype, signals: Sequence[str] = SIGNAL_NAMES) -> list[str]:
    """The signals a run of this dtype recomputes in float32 (`a32_<s>` columns): the precision-sensitive
    ones (`arca.credit.signals.precision_sensitive`) when `dtype` is not float32, none when it is."""
    return [] if dtype == torch.float32 else precision_sensitive(signals)


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


def raw_saliences(
    model: torch.nn.Module,
    rollouts: Rollouts,
    signals: Sequence[str],
    layer: int = -1,
    batch_size: int = 8,
    temperature: float = 1.0,
    progress: str | None = None,
) -> dict[str, Tensor]:
    """name -> (N, C) float32 raw saliences over completion positions (0 on padding), `batch_size` rows per pass.

    `temperature` is the sampling temperature, as TRL's log-probs and the trainer use it. `progress`: the label of
    a progress bar over the rows (`arca.progress`); None: silent.
    """
    p = rollouts.prompt_length
    device = next(model.parameters()).device
    out: dict[str, list[Tensor]] = {name: [] for name in signals}
    rows = rollouts.input_ids.shape[0]
    with progress_bar(total=rows, desc=progress, unit="seq") as bar:
        for start in range(0, rows, batch_size):
            sl = slice(start, start + batch_size)
            raw = compute_signals(
                model,
                rollouts.input_ids[sl].to(device),
                rollouts.attention_mask[sl].to(device),
                rollouts.completion_mask[sl].to(device),
                layer=layer,
                names=signals,
                temperature=temperature,
            )
            for name in signals:
                out[name].append(raw[name][:, p:].float().cpu())  # (b, C)
            bar.update(min(batch_size, rows - start))
    return {name: torch.cat(parts) for name, parts in out.items()}


def float32_saliences(
    model: torch.nn.Module,
    rollouts: Rollouts,
    signals: Sequence[str],
    layer: int = -1,
    batch_size: int = 8,
    temperature: float = 1.0,
    progress: str | None = None,
) -> dict[str, Tensor]:
    """`raw_saliences` with every weight upcast to float32 in place (`arca.credit.precision.float32_weights`): the
    float32 truth of a low-precision run on the very same rollouts and checkpoint; the weights are restored
    bit for bit afterwards. Empty when `signals` is."""
    if not signals:
        return {}
    with float32_weights(model):
        return raw_saliences(model, rollouts, signals, layer, batch_size, temperature, progress)


def normalized(raw: dict[str, Tensor], rollouts: Rollouts, credit: CreditConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (raw saliences, weights normalized with the run's credit params), each (N, C).

    The weights are never permuted, whatever `credit.permute`: a dump scores every signal at its own positions
    (a permutation changes no concentration statistic, and SPEC 9's permuted control draws its own)."""
    mask = rollouts.completion_mask[:, rollouts.prompt_length :]  # (N, C)
    out = {}
    for name, a in raw.items():
        w, _ = normalize(a, mask, **credit.normalization())  # never permuted: the signal's own positions
        out[name] = (a, w)
    return out


def signal_weights(
    model: torch.nn.Module,
    rollouts: Rollouts,
    credit: CreditConfig,
    signals: Sequence[str],
    batch_size: int = 8,
    temperature: float = 1.0,
    progress: str | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (raw saliences, normalized weights), each (N, C) over completion positions; `progress` labels a
    progress bar (None: silent)."""
    raw = raw_saliences(model, rollouts, signals, credit.layer, batch_size, temperature, progress)
    return normalized(raw, rollouts, credit)


def token_table(
    rollouts: Rollouts,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[str],
    rewards: Tensor,
    weights: dict[str, tuple[Tensor, Tensor]],
    meta: dict[str, object],
    float32: dict[str, Tensor] | None = None,
) -> pd.DataFrame:
    """Flatten to one row per valid completion token, ordered (prompt_id, sample, pos).

    `meta` holds run, method, rank, seed, step. `advantage` is the sequence-level group-normalized
    advantage A_i (the per-token advantage of a method is A_i * w_<method>). `float32` (name -> (N, C), from
    `float32_saliences`) adds the `a32_<name>` columns of a low-precision run; columns follow `dump_schema`.
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
    for name, a32 in (float32 or {}).items():
        data[f"a32_{name}"] = a32[row, pos].numpy()
    df = pd.DataFrame(data)
    df = df.sort_values(["prompt_id", "sample", "pos"], kind="stable").reset_index(drop=True)
    schema = dump_schema(list(weights), list(float32 or {}))
    df = df[schema.names]
    return df.astype({f.name: _pandas_dtype(f.type) for f in schema})


def _pandas_dtype(t: pa.DataType) -> str:
    return {pa.int32(): "int32", pa.float32(): "float32"}.get(t, "object")
