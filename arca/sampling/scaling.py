"""`pi_c`, the adapter scaled by `c` (SPEC 10): every LoRA update `s_m B_m A_m x` times `c`, by scaling each PEFT
LoRA layer's `scaling[adapter]` in place, and the relative size of that update against the base weights.

Why the scaling and not the weights: `s_m` is a Python float PEFT multiplies in at every forward, so scaling it
touches no tensor (nothing to round in bf16), `c = 0` is exactly the reference (`result + 0 * lora`), `c = 1`
is exactly the adapter, and `arca_local` (arca.credit.lora_local reads `scaling`) measures `c s_m B_m A_m x` too.
`disable_adapter()` inside the block still gives the reference: PEFT skips the LoRA branch altogether.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from arca.credit.lora_local import lora_layers


def _active(layer) -> list[str]:
    """The layer's active adapters that it holds (a layer may lack an adapter that targets other modules)."""
    return [name for name in layer.active_adapters if name in layer.lora_A]


@contextmanager
def scaled_adapter(model: nn.Module, c: float) -> Iterator[nn.Module]:
    """Multiply every active LoRA update of `model` by `c` inside the block; every scaling is restored exactly
    on exit (the saved floats are put back, never divided by `c`), also when the block raises.

    Args:
        model: a `peft.PeftModel` (or any module holding PEFT LoRA layers), not merged.
        c: the scale, finite and >= 0 (0 = the reference policy, 1 = the adapter as trained).
    """
    if not (math.isfinite(c) and c >= 0):
        raise ValueError(f"c: the adapter scale must be finite and >= 0, got {c}")
    layers = lora_layers(model)  # refuses LoRA variants (DoRA): their update is not linear in the scaling
    if not layers:
        raise ValueError("model: has no LoRA layers to scale; wrap it with peft (get_peft_model / PeftModel)")
    if any(layer.merged for layer in layers):
        raise ValueError("model: a merged adapter cannot be scaled (its update is in the base weights); unmerge it")
    saved = [(layer, name, layer.scaling[name]) for layer in layers for name in _active(layer)]
    try:
        for layer, name, value in saved:
            layer.scaling[name] = value * c
        yield model
    finally:
        for layer, name, value in saved:
            layer.scaling[name] = value


@torch.no_grad()
def relative_update_size(model: nn.Module, c: float = 1.0) -> float:
    """`sqrt(sum_m ||c sum_a s_a B_a A_a||_F^2 / sum_m ||W_m||_F^2)` over the LoRA-wrapped modules `m` (active
    adapters `a`), in float32, without forming any (out x in) product.

    `||B A||_F^2 = trace((B^T B)(A A^T))` = the elementwise sum of two (R x R) Gram matrices, with `B` the
    scaled `B_a` side by side (out x R) and `A` the `A_a` stacked (R x in), so several adapters' cross terms count.
    Linear in `c`; 0 for an untrained LoRA (`B = 0`).
    """
    update, base = 0.0, 0.0
    for layer in lora_layers(model):
        names = _active(layer)
        weight = layer.get_base_layer().weight.detach().float()  # (out, in)
        base += float(weight.pow(2).sum())
        if not names:
            continue
        b = torch.cat([layer.lora_B[n].weight.detach().float() * layer.scaling[n] for n in names], dim=1)  # (out, R)
        a = torch.cat([layer.lora_A[n].weight.detach().float() for n in names], dim=0)  # (R, in)
        update += float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0))
    if base == 0:
        raise ValueError("model: its LoRA-wrapped base weights are all zero; the relative update size is undefined")
    return abs(c) * math.sqrt(update / base)
