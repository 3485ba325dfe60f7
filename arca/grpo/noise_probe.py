"""The trainer's running noise estimate (SPEC 2b): in a run whose weights (or autocast) are not float32, every
logging step scores a fixed probe (the first `PROBE_ROWS` sequences of the first training micro-batch) with
`compute_signals` in the run's precision and in float32 (`float32_weights`), and reports `noise_<s>` (noise
share) and `noise_rank_<s>` (rank correlation with float32) for every signal in `NOISE_SIGNALS`: four forwards
of two sequences and an in-place upcast of the frozen weights per logging step, outside the training passes.

Left out: ZeRO/FSDP (the in-place upcast needs whole weights); the probe is per process.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch import Tensor, nn
from trl.trainer.utils import maybe_gather_lm_head_ctx

from arca.credit.precision import float32_weights, noise_share, rank_correlation
from arca.credit.signals import SIGNAL_NAMES, compute_signals, precision_sensitive
from arca.grpo.capture import loss_mask, sequences

# Signals whose bf16 rounding noise the training log reports (`credit/noise_<s>`, `credit/noise_rank_<s>`).
NOISE_SIGNALS: tuple[str, ...] = tuple(precision_sensitive(SIGNAL_NAMES))
PROBE_ROWS = 2  # sequences in the noise probe: enough for a rank correlation, cheap next to a step


def low_precision(model: nn.Module, accelerator: Accelerator) -> bool:
    """Whether the run computes below float32: non-float32 floating weights, or mixed-precision autocast."""
    if accelerator.mixed_precision in ("bf16", "fp16"):
        return True
    return any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())


class NoiseProbe:
    """Keeps the probe sequences and measures the noise of `NOISE_SIGNALS` on them.

    Args:
        model: the unwrapped policy (a `PeftModel`). accelerator: the trainer's (autocast, mixed precision).
        layer: HF `hidden_states` index of ARCA's residual. temperature: the sampling temperature TRL applies.
        sharded: whether weights are sharded (DeepSpeed ZeRO / FSDP): the probe is then off.

    Attributes:
        enabled: whether the run is low-precision, PEFT and unsharded (else `keep` and `measure` never act).
    """

    def __init__(self, model: nn.Module, accelerator: Accelerator, layer: int, temperature: float, sharded: bool):
        self.model, self.accelerator, self.layer, self.temperature = model, accelerator, layer, temperature
        self.enabled = isinstance(model, PeftModel) and low_precision(model, accelerator) and not sharded
        self.probe: tuple[Tensor, Tensor, Tensor] | None = None  # input_ids, attention_mask, scored (P + T)

    def keep(self, inputs: dict[str, Any]) -> None:
        """Keep the first `PROBE_ROWS` sequences of the first micro-batch it sees (call it in training only)."""
        if not self.enabled or self.probe is not None:
            return
        input_ids, attention_mask, _ = sequences(inputs)  # (B, P + T) each
        scored = torch.cat([torch.zeros_like(inputs["prompt_mask"]), loss_mask(inputs)], dim=1)  # (B, P + T)
        rows = slice(0, PROBE_ROWS)
        self.probe = (input_ids[rows].clone(), attention_mask[rows].clone(), scored[rows].clone())

    def measure(self) -> dict[str, float]:
        """`noise_<s>` (`||a - a32|| / ||a32||`) and `noise_rank_<s>` (rank correlation of `a` with `a32`) of each
        `NOISE_SIGNALS` on the probe, `a` scored in the run's precision and `a32` with float32 weights; {} before
        a probe is kept."""
        if self.probe is None:
            return {}
        input_ids, attention_mask, scored = self.probe
        score = functools.partial(
            compute_signals,
            self.model,
            input_ids,
            attention_mask,
            scored,
            layer=self.layer,
            names=NOISE_SIGNALS,
            temperature=self.temperature,
            gather_head=maybe_gather_lm_head_ctx,
        )  # eval mode, no grad; every module's mode is restored
        with self.accelerator.autocast():
            low = score()  # name -> (PROBE_ROWS, P + T)
        with float32_weights(self.model):
            exact = score()
        mask = (scored != 0) & (attention_mask != 0)
        noise = {}
        for name in NOISE_SIGNALS:
            noise[f"noise_{name}"] = noise_share(low[name], exact[name], mask)
            noise[f"noise_rank_{name}"] = rank_correlation(low[name], exact[name], mask)
        return noise
