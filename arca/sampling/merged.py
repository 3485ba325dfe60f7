"""The adapter merged into copies of the base weights, `W + s B A`, never into the base weights themselves.

Two users: TRL's vLLM weight sync (`arca.grpo.trainer`), which otherwise runs PEFT's `merge_adapter()` /
`unmerge_adapter()` in place at every step, and HF decoding in evaluation (`merged_copy`), where an unmerged
LoRA model pays two extra rank-r matmuls per module per token.

Why copies: in bfloat16, `(W + d) - d` is not `W`; one in-place merge/unmerge cycle changed 2.9% of a bf16
weight's entries (measured on CPU), so the frozen base drifted at every step and the `matched` reference stopped
being the base that dump and evaluate load. The merged weight here is computed in float32 and rounded once to
the weight's dtype, which is also what a merge in the weight's dtype approximates.

Left out: LoRA variants (DoRA; refused by `arca.credit.lora_local.lora_layers`), sharded weights (ZeRO-3 / FSDP keep
TRL's own path), and `modules_to_save` copies beyond passing their trained weights through.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn

from arca.credit.lora_local import lora_layers


def merged_weight(layer: nn.Module) -> Tensor:
    """`W + sum_a s_a B_a A_a` of one PEFT LoRA layer over its active adapters: a new tensor with W's dtype and
    device (float32 arithmetic, one rounding); W is never written. A disabled adapter gives a copy of W."""
    weight = layer.get_base_layer().weight
    if layer.merged:
        raise ValueError("model: the adapter is merged in place already; unmerge it (or reload the base model)")
    merged = weight.detach().to(torch.float32, copy=True)  # (out, in), never W's own storage
    if layer.disable_adapters:
        return merged.to(weight.dtype)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a = layer.lora_A[name].weight.detach().float()  # (r, in)
        b = layer.lora_B[name].weight.detach().float()  # (out, r)
        delta = (b @ a) * layer.scaling[name]  # (out, in)
        merged += delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    return merged.to(weight.dtype)


def merged_named_weights(model: PeftModel) -> Iterator[tuple[str, Tensor]]:
    """The base model's parameters under their un-PEFT names (`model.layers.0.mlp.down_proj.weight`), each LoRA
    base weight replaced by `merged_weight`, every other one as is; the LoRA factors themselves are left out.
    Names follow TRL's vLLM sync (prefix `base_model.model.` and `.base_layer` removed)."""
    merged = {id(layer.get_base_layer().weight): layer for layer in lora_layers(model)}
    for name, param in model.named_parameters():
        if model.prefix in name or "original_module" in name:  # LoRA factors; a modules_to_save original
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        name = name.replace("modules_to_save.default.", "")
        layer = merged.get(id(param))
        yield name, (merged_weight(layer) if layer is not None else param.data)


def sync_merged_copies(generation: Any, policy: Callable[[], PeftModel]) -> None:
    """Make TRL's `VLLMGeneration.sync_weights` load `merged_named_weights(policy())` into vLLM: it replaces the
    generation's `_iter_named_params` (TRL's PEFT branch there merges the adapter in place and unmerges it).

    Args:
        generation: the trainer's `trl.generation.vllm_generation.VLLMGeneration`.
        policy: returns the unwrapped `PeftModel` at sync time (the trainer's model, under its wrappers).
    """

    def iter_named_params() -> Iterator[tuple[str, Tensor]]:
        for name, tensor in merged_named_weights(policy()):
            yield generation._fix_param_name_to_vllm(name), tensor  # e.g. `_checkpoint_wrapped_module.` removed

    generation._iter_named_params = iter_named_params


@torch.no_grad()
def merged_copy(model: PeftModel) -> nn.Module:
    """A plain (non-PEFT) copy of `model` with every LoRA update merged in (`merged_weight`), for decoding:
    `model` and its base weights are untouched. Costs one copy of the model's weights."""
    out = copy.deepcopy(model)
    for layer in lora_layers(out):
        layer.get_base_layer().weight.data = merged_weight(layer)
    return out.unload()  # drops the LoRA modules, keeping the (now merged) base layers
