"""`arca_local` (SPEC 2): per token, the sum over LoRA-wrapped modules of `||s_m * B_m A_m x_m,t||_2`, captured by
forward hooks on PEFT's LoRA layers while the adapter-on pass runs.

Why hooks and not a second pass: the adapter's own output at each module is known inside the one pass that
the loss (or the dump) runs anyway, so the signal costs two rank-r matmuls per module on the scored positions
only, never a reference pass, and it has no cancellation: it is exactly 0 when every `B_m = 0`, in any dtype.
The product is recomputed from the module's input `x` (before LoRA dropout) in float32, so neither dropout
nor the run's dtype rounds the adapter output itself.

Left out: DoRA and other PEFT LoRA variants (their update is not `s * B A x`; refused with an error), and
mixed-adapter batches (`adapter_names=`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from arca.credit.precision import no_autocast


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """Every PEFT LoRA layer of `model` that wraps a linear map (the modules `arca_local` sums over)."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_A")]
    for layer in layers:
        if getattr(layer, "lora_variant", None):
            raise ValueError("model: arca_local supports plain LoRA only (found a LoRA variant such as DoRA)")
    return layers


def lora_output_norm(layer: LoraLayer, x: Tensor) -> Tensor:
    """`sum_a ||s_a * B_a A_a x||_2` over the layer's active adapters, float32, for `x` of shape (..., in).

    Returns (...,) float32; zeros when the adapter is disabled or merged (its output then is the base map's).
    """
    total = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    if layer.disable_adapters or layer.merged:
        return total
    x32 = x.detach().float()
    with no_autocast(x.device.type):  # in the loss forward of a bf16 run autocast would make these bf16 matmuls
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            a = layer.lora_A[name].weight.detach().float()  # (r, in)
            b = layer.lora_B[name].weight.detach().float()  # (out, r)
            update = torch.nn.functional.linear(torch.nn.functional.linear(x32, a), b) * layer.scaling[name]
            total += torch.linalg.vector_norm(update, dim=-1)  # update: (..., out)
    return total


class LoraNormCapture:
    """Forward hooks on every LoRA layer that, while armed, add up `lora_output_norm` per token.

    Args:
        model: a `peft.PeftModel` (or any module holding PEFT LoRA layers).

    Use `with capture.arm(num_tokens) as c:` around a pass; `c.norms()` then gives (B, num_tokens) float32
    norms at the positions whose logits predict the last `num_tokens` tokens (positions `-num_tokens-1 .. -2`),
    one row per sequence over every forward call made while armed (chunks are concatenated along the batch).
    """

    def __init__(self, model: nn.Module):
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError("model: arca_local needs LoRA layers; wrap the model with peft.get_peft_model")
        self.armed = False
        self._num_tokens = 0
        self._calls: list[dict[int, Tensor]] = []  # one dict per forward call: layer index -> (b, T)
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.armed or not args:  # disarmed: e.g. gradient-checkpoint recomputation in backward
                return
            x = args[0]  # (b, L, in), the layer input before LoRA dropout
            norms = lora_output_norm(module, x[:, -self._num_tokens - 1 : -1])  # (b, T)
            if not self._calls or index in self._calls[-1]:  # each layer runs once per forward call
                self._calls.append({})
            self._calls[-1][index] = norms

        return hook

    @contextmanager
    def arm(self, num_tokens: int) -> Iterator[LoraNormCapture]:
        if num_tokens < 1:
            raise ValueError(f"num_tokens: must be >= 1, got {num_tokens}")
        self._num_tokens, self._calls, self.armed = num_tokens, [], True
        try:
            yield self
        finally:
            self.armed = False

    def norms(self) -> Tensor:
        """(B, num_tokens) float32: the per-token sum over LoRA layers, for every call made while armed."""
        if not self._calls:
            raise RuntimeError("arca_local: no LoRA layer ran while the capture was armed")
        rows = [torch.stack(list(call.values())).sum(0) for call in self._calls]  # each (b, T)
        self._calls = []
        return torch.cat(rows)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def capture_lora_norms(model: nn.Module, num_tokens: int) -> Iterator[LoraNormCapture]:
    """One-shot `LoraNormCapture`: hooks are registered for the block and removed after it."""
    capture = LoraNormCapture(model)
    try:
        with capture.arm(num_tokens):
            yield capture
    finally:
        capture.remove()
