"""Where the trainer's credit reads its states from: forward hooks that keep a module's output while a pass of
interest runs (TRL's fused LM head never returns logits or hidden states), which module holds which HF
`hidden_states` entry, and the small pieces of TRL's micro-batch layout the credit passes rebuild."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

# Batch keys TRL's `_compute_loss` passes to the model besides ids and masks (vision inputs).
FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _module_output(output: Any) -> Tensor:
    """The hidden-state tensor of a backbone (`last_hidden_state`), decoder layer or embedding output."""
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0] if isinstance(output, tuple) else output


class StateCapture:
    """Forward hooks that keep the detached outputs of a few modules while armed (a no-op otherwise).

    Args:
        sources: name -> module whose output is kept (`final`: the backbone, post-norm; `arca`: the module
            whose output is HF `hidden_states[credit_layer]`).
    """

    def __init__(self, sources: dict[str, nn.Module]):
        self.armed = False
        self.kept: dict[str, list[Tensor]] = {name: [] for name in sources}
        for name, module in sources.items():
            module.register_forward_hook(self._keeper(name))

    def _keeper(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.armed:  # gradient-checkpoint recomputation in backward runs disarmed
                self.kept[name].append(_module_output(output).detach())

        return hook

    @contextmanager
    def arm(self) -> Iterator[StateCapture]:
        self.kept = {name: [] for name in self.kept}
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False

    def completion_states(self, num_tokens: int) -> dict[str, Tensor]:
        """name -> (B, T, H) states at the positions whose logits predict the last `num_tokens` tokens, copied
        out of the kept full-length outputs, which are then released."""
        if any(not chunks for chunks in self.kept.values()):
            raise RuntimeError("credit: a hooked module did not run during the captured pass")
        states = {name: torch.cat([h[:, -num_tokens - 1 : -1] for h in chunks]) for name, chunks in self.kept.items()}
        self.kept = {name: [] for name in self.kept}
        return states


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack (e.g. `Qwen3Model`) that TRL's fused LM head runs before projecting."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


def layer_module(decoder: nn.Module, layer: int) -> nn.Module:
    """The module whose output is HF `hidden_states[layer]` (the backbone itself for the final state)."""
    n_states = len(decoder.layers) + 1
    if not -n_states <= layer < n_states:
        raise ValueError(
            f"credit_layer: must be in [{-n_states}, {n_states - 1}] for this model ({n_states} hidden states), "
            f"got {layer}"
        )
    index = layer % n_states
    if index == n_states - 1:
        return decoder
    return decoder.get_input_embeddings() if index == 0 else decoder.layers[index - 1]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) inside the block; each module's own mode is restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def has_dropout(model: nn.Module) -> bool:
    """Whether a train-mode forward of `model` is random: a dropout module with p > 0 (LoRA dropout included,
    unless TRL's `disable_dropout` zeroed it) or an attention dropout in the config."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    return float(getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0) > 0


def sequences(batch: dict[str, Any]) -> tuple[Tensor, Tensor, int]:
    """(input_ids (B, P + T), attention_mask (B, P + T), T) of a micro-batch, built as TRL's `_compute_loss` does."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask, batch["completion_ids"].size(1)


def loss_mask(inputs: dict[str, Any]) -> Tensor:
    """(B, T) mask of the tokens TRL's loss counts (completion tokens, minus tool output if any)."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def trl_head_is_exact(model: nn.Module, cast_lm_head_to_fp32: bool, mixed_precision: str) -> bool:
    """Whether TRL's fused LM head computes SPEC 2's float32 log-softmax, so its per-token log-prob and entropy
    are ours: its compute dtype is float32 (`cast_lm_head_to_fp32`, or a float32 head outside mixed precision)
    and it applies no output multiplier `arca.credit.vocab.LogitMap` lacks (families whose scale TRL reads from
    other config keys)."""
    config = model.config.get_text_config()
    extra = any(getattr(config, key, None) is not None for key in ("output_multiplier", "lm_head_multiplier"))
    float32 = cast_lm_head_to_fp32 or (
        mixed_precision == "no" and model.get_output_embeddings().weight.dtype == torch.float32
    )
    return float32 and not extra and config.model_type != "hyperclovax"
