"""How much of a low-precision salience is rounding noise (SPEC 2b): the same model recomputed in float32, and
the two numbers the tables report, the noise share `||a - a32|| / ||a32||` and the rank correlation of `a`
with `a32` within each trajectory.

Why upcasting in place is safe: bfloat16 and float16 are subsets of float32, so casting the weights up and
back down restores them bit for bit; no second copy of a 1.7B model is ever held.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn


@contextmanager
def float32_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in float32 inside the block (autocast off, Accelerate's autocast wrapper of `forward` too),
    then restore every tensor's dtype and every forward exactly.

    Only floating parameters and buffers that are not float32 are touched; float32 ones (e.g. a LoRA
    adapter PEFT keeps in float32 beside a bf16 base) are never rounded.
    """
    changed: list[tuple[nn.Module, str, bool, torch.dtype]] = []
    for module in model.modules():
        for is_param, tensors in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in tensors.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                    changed.append((module, name, is_param, tensor.dtype))
                    tensor.data = tensor.data.float()
    # Accelerate's mixed precision wraps `forward` in its own autocast, entered inside this block's, so it would
    # turn autocast back on for every matmul (bf16 in, bf16 out): the wrapped forwards are unwrapped meanwhile.
    wrapped = [(m, m.__dict__["forward"]) for m in model.modules() if _accelerate_wrapped(m)]
    for module, _ in wrapped:
        module.forward = module._original_forward
    device_type = next(model.parameters()).device.type
    try:
        with no_autocast(device_type):
            yield model
    finally:
        for module, forward in wrapped:
            module.forward = forward
        for module, name, is_param, dtype in changed:
            tensor = (module._parameters if is_param else module._buffers)[name]
            tensor.data = tensor.data.to(dtype)


def _accelerate_wrapped(module: nn.Module) -> bool:
    """Whether `accelerator.prepare` replaced the module's `forward` by its autocast wrapper (it keeps the
    original as `_original_forward`; `unwrap_model` keeps the wrapper by default)."""
    return "forward" in module.__dict__ and hasattr(module, "_original_forward")


def no_autocast(device_type: str) -> AbstractContextManager:
    """Autocast off on `device_type` for the block (a no-op where that device has no autocast, e.g. meta), so a
    float32 computation stays float32 inside a mixed-precision training step."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


def noise_share(a: Tensor, a32: Tensor, mask: Tensor) -> float:
    """`||a - a32||_2 / ||a32||_2` over the valid tokens of (B, T) saliences; 0 when both are all zero,
    inf when only `a32` is (noise with no signal under it)."""
    m = mask.bool()
    diff = torch.linalg.vector_norm((a.double() - a32.double())[m])
    ref = torch.linalg.vector_norm(a32.double()[m])
    if ref == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / ref)


def rank_correlation(a: Tensor, a32: Tensor, mask: Tensor) -> float:
    """Mean over trajectories of the Spearman correlation of `a` with `a32` on the row's valid tokens (average
    ranks for ties); rows with fewer than 2 tokens, or constant in either, are skipped (NaN if none is left)."""
    values = []
    for row_a, row_b, row_m in zip(a, a32, mask.bool()):
        x, y = row_a[row_m].double(), row_b[row_m].double()
        if x.numel() < 2:
            continue
        rx, ry = _average_ranks(x), _average_ranks(y)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        denom = torch.linalg.vector_norm(rx) * torch.linalg.vector_norm(ry)
        if denom > 0:
            values.append(float((rx * ry).sum() / denom))
    return sum(values) / len(values) if values else float("nan")


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their mean rank."""
    # Every new tensor on x's device: a constructor without `device=` lands on the CPU (or the default device),
    # and `ranks[order] = <CPU tensor>` on a CUDA `x` raises (the trainer's noise probe at its first log).
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype, device=x.device)
    unique, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(unique.numel(), dtype=x.dtype, device=x.device).scatter_add_(0, inverse, ranks)
    counts = torch.zeros(unique.numel(), dtype=x.dtype, device=x.device).scatter_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]
