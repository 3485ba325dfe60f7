"""The float32 sweep of the vocabulary behind every logit-level signal: hidden states mapped to the model's own
logits (`LogitMap`: scale and softcap as its forward applies them), then log-probs, entropies and the exact
per-token KL, over the valid tokens only, a chunk at a time (a (B*T, V) float32 tensor would not fit)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from arca.credit.precision import no_autocast


def no_gather(*params: object) -> AbstractContextManager:
    """No gathering: the head's weight is whole (anything but DeepSpeed ZeRO-3)."""
    return nullcontext()


def flat(x: Tensor, n: int) -> Tensor:
    return x.detach().reshape(n, -1)  # (B*T, D): a view, so only valid rows are ever copied


@dataclass(frozen=True)
class LogitMap:
    """What a model's forward does to `lm_head(h)` before it returns logits, so hidden states + head give the
    model's own logits: `softcap * tanh(scale * z / softcap)` (Cohere's `logit_scale`, Granite's
    `1 / logits_scaling`, Gemma-2's `final_logit_softcapping`). The sampling temperature comes after it."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, z: Tensor) -> Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def logit_map(model: torch.nn.Module) -> LogitMap:
    """The `LogitMap` of an HF causal LM (PEFT-wrapped or not), read from its (text) config."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        scale /= float(scaling)
    return LogitMap(scale=scale, softcap=getattr(config, "final_logit_softcapping", None))


def float_head(
    lm_head: torch.nn.Module, gather: Callable[..., AbstractContextManager] = no_gather
) -> tuple[Tensor, Tensor | None]:
    """The head's weight (and bias) in float32, read inside `gather(weight, bias)`: the trainer passes TRL's
    `maybe_gather_lm_head_ctx`, which gathers the head where DeepSpeed ZeRO-3 shards it (this room has no TRL)."""
    bias = getattr(lm_head, "bias", None)
    with gather(lm_head.weight, bias):
        return lm_head.weight.detach().float(), None if bias is None else bias.detach().float()


def vocab_stats(
    sides: list[tuple[Tensor, tuple[Tensor, Tensor | None] | None]],
    targets: Tensor,
    rows: Tensor,
    temperature: float,
    chunk_tokens: int,
    to_logits: LogitMap = LogitMap(),
) -> dict[str, Tensor]:
    """The single float32 sweep of the vocabulary, over the valid `rows` only, `chunk_tokens` at a time.

    Args:
        sides: [policy], [policy, reference] or [None, reference] (the policy's statistics came from elsewhere),
            each (states (B*T, D), head): states are logits (D = V) when head is None, else hidden states mapped
            to logits by head = (weight (V, H), bias (V,)).
        targets: (B*T,) token ids; rows: (N,) flat indices of the valid tokens.
    Returns:
        (N,) float32 `logp`, `entropy` of a swept policy side, `ref_logp`, `ref_entropy` of a swept reference
        side, and `kl` when both are swept.
    """

    def log_probs(states: Tensor, head: tuple[Tensor, Tensor | None] | None, idx: Tensor) -> Tensor:
        z = states[idx].float()  # (c, D)
        # Autocast off: inside a mixed-precision step (the trainer's loss forward, the noise probe) autocast
        # would run this float32 head matmul in bf16.
        with no_autocast(z.device.type):
            if head is not None:
                z = to_logits(torch.nn.functional.linear(z, *head))  # (c, V) the model's own output logits
            return torch.log_softmax(z / temperature, dim=-1)  # (c, V)

    policy, ref = sides[0], sides[1] if len(sides) == 2 else None
    keys = (("logp", "entropy") if policy else ()) + (("ref_logp", "ref_entropy") if ref else ())
    out: dict[str, list[Tensor]] = {k: [] for k in keys + (("kl",) if policy and ref else ())}
    for start in range(0, rows.numel(), chunk_tokens):
        idx = rows[start : start + chunk_tokens]  # (c,)
        logp = log_probs(*policy, idx) if policy else None  # (c, V)
        logq = log_probs(*ref, idx) if ref else None  # (c, V)
        probs = None
        for prefix, logits in (("", logp), ("ref_", logq)):
            if logits is not None:
                side_probs = logits.exp()
                probs = side_probs if not prefix else probs
                out[f"{prefix}logp"].append(logits.gather(1, targets[idx, None]).squeeze(1))  # (c,)
                out[f"{prefix}entropy"].append(-(side_probs * logits).sum(-1))
        if logp is not None and logq is not None:
            # Exact KL(pi_theta || pi_ref) can round to -1e-7; a divergence is >= 0.
            out["kl"].append((probs * (logp - logq)).sum(-1).clamp_min(0.0))
    empty = torch.zeros(0, device=rows.device)
    return {k: torch.cat(v) if v else empty for k, v in out.items()}
