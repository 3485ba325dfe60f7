"""GRPO with per-token credit (SPEC section 4): TRL's `GRPOTrainer` with the advantage `A_i` of every token
scaled by a detached weight `w_i,t`, computed from the forward passes TRL already runs.

How the weights are found without extra passes: TRL's fused LM head never returns logits or hidden states,
so forward hooks on the backbone (or on the decoder layer `credit.layer` picks) keep its output while a
pass of interest runs. The adapter-off states come from TRL's own reference pass when `beta > 0`, and from
one extra no-grad adapter-off backbone pass per micro-batch when `beta == 0`; they travel in the generation
batch (first dim = batch, so TRL shuffles and splits them with everything else). The adapter-on states come
from the training forward of `_compute_loss`; the weights are built between that forward and the point
where TRL reads the advantages, and put back into the batch as `(B, T)` advantages, which TRL's loss
accepts. `uniform` goes through TRL untouched (bit-identical to a plain `GRPOTrainer`); `top_entropy` is
TRL's own `top_entropy_quantile` mask.

Left out: a non-PEFT policy (the reference must be the same weights under `disable_adapter()`), vision
inputs in the extra reference pass, and the weights' effect on TRL's entropy bonus (which is unweighted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import RepeatSampler, use_adapter

from arca.credit import normalize
from arca.credit_config import CreditConfig
from arca.diagnostics import effective_token_ratio, gini, regime
from arca.signals import needs_reference, signals_from_states

logger = logging.getLogger(__name__)

# Metrics added to TRL's log (as `credit/<name>`), means over the trajectories of each logging window.
CREDIT_METRICS = ("gini", "etr", "frac_uniform", "frac_middle", "frac_concentrated", "fallback_rate", "max_weight")
# Batch keys holding adapter-off states (B, T, H), one per state source ("final" and/or "arca").
REF_KEY = "credit_ref_{}"
_FIXED_CREDIT = ("uniform", "top_entropy")  # methods whose weights need no captured states


def _module_output(output: Any) -> Tensor:
    """The hidden-state tensor of a backbone (`last_hidden_state`), decoder layer or embedding output."""
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0] if isinstance(output, tuple) else output


class _StateCapture:
    """Forward hooks that keep the detached outputs of a few modules while armed (a no-op otherwise).

    Args:
        sources: name -> module whose output is kept (`final`: the backbone, post-norm; `arca`: the module
            whose output is HF `hidden_states[credit.layer]`).
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
    def arm(self) -> Iterator[_StateCapture]:
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


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack (e.g. `Qwen3Model`) that TRL's fused LM head runs before projecting."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


def _layer_module(backbone: nn.Module, layer: int) -> nn.Module:
    """The module whose output is HF `hidden_states[layer]` (the backbone itself for the final state)."""
    n_states = len(backbone.layers) + 1
    if not -n_states <= layer < n_states:
        raise ValueError(
            f"params.yaml: credit.layer must be in [{-n_states}, {n_states - 1}] for this model "
            f"({n_states} hidden states), got {layer}"
        )
    index = layer % n_states
    if index == n_states - 1:
        return backbone
    return backbone.get_input_embeddings() if index == 0 else backbone.layers[index - 1]


class _EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` reseeded with `seed + epoch` at each epoch, so that a run resumed in a later
    epoch (whose skipped epochs are never iterated) draws the same order as an uninterrupted one. Epoch 0
    is TRL's order exactly."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed + epoch)


class CreditGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose per-token advantage is `A_i * w_i,t`, with `w` from `credit` (SPEC sections 2-4).

    Args:
        *args, **kwargs: as for `trl.GRPOTrainer`. Pass the base model with `peft_config=`: with an already
            wrapped `PeftModel` and `beta != 0`, TRL's reference is a frozen adapter copy, not the base model.
        credit: the method and its normalization. For `top_entropy`, `args.top_entropy_quantile` must equal
            `credit.top_entropy_quantile`; for every other method it must stay 1.0.

    Attributes:
        generated_tokens: completion tokens generated so far in training (sum of completion masks, all
            processes); the caller restores it when resuming.
        last_credit: the last micro-batch's `saliences`, `weights` (B, T), `fallback` (B,) and `mask`.
    """

    def __init__(self, *args: Any, credit: CreditConfig, **kwargs: Any):
        self.credit = credit
        super().__init__(*args, **kwargs)
        self.generated_tokens = 0
        self.last_credit: dict[str, Tensor] | None = None
        self._loss_inputs: dict[str, Any] | None = None  # the batch whose advantages the loss forward sets
        self._capturing_reference = False
        self._ref_states: dict[str, Tensor] | None = None
        self._needs_reference = credit.method not in _FIXED_CREDIT and needs_reference([credit.method])
        self._check_setup()
        if credit.method not in _FIXED_CREDIT:
            self._capture = _StateCapture(self._state_sources())
        if self._needs_reference:
            model = self.accelerator.unwrap_model(self.model)
            self._adapter_layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))

    def _check_setup(self) -> None:
        method, quantile = self.credit.method, self.args.top_entropy_quantile
        if method == "top_entropy" and quantile != self.credit.top_entropy_quantile:
            raise ValueError(
                f"args.top_entropy_quantile: {quantile} does not match credit.top_entropy_quantile "
                f"{self.credit.top_entropy_quantile}; set GRPOConfig(top_entropy_quantile=...) to it"
            )
        if method != "top_entropy" and quantile != 1.0:
            raise ValueError(
                f"args.top_entropy_quantile: {quantile} would mask tokens on top of method "
                f"{method!r}; leave it at 1.0 (it is the `top_entropy` method)"
            )
        if not self._needs_reference:
            return
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "disable_adapter"):
            raise ValueError(f"model: method {method!r} needs the adapter-off pass; pass peft_config=LoraConfig(...)")
        if "ref" in model.peft_config:
            raise ValueError(
                f"model: method {method!r} needs the base model as reference, but TRL made a frozen "
                "adapter copy ('ref'); pass the unwrapped model with peft_config= instead"
            )

    def _state_sources(self) -> dict[str, nn.Module]:
        """Which modules' outputs the method reads: `final` for logits signals, `arca` for the residual."""
        backbone = _backbone(self.accelerator.unwrap_model(self.model))
        if self.credit.method == "arca":
            return {"arca": _layer_module(backbone, self.credit.layer)}
        return {"final": backbone}

    # ---- sampling ------------------------------------------------------------------------------------------

    def _get_train_sampler(self, dataset=None) -> RepeatSampler:
        return _EpochSeededRepeatSampler(
            data_source=self.train_dataset if dataset is None else dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    # ---- generation: adapter-off states ride along with the batch -------------------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not self._needs_reference:
            output = super()._generate_and_score_completions(inputs)
        else:
            self._ref_states, self._capturing_reference = None, self.beta != 0.0
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self._capturing_reference = False
            states = self._ref_states if self.beta != 0.0 else self._reference_pass(output)
            self._ref_states = None
            if states is None:
                raise RuntimeError("credit: TRL's reference pass (beta != 0) was not captured")
            output.update({REF_KEY.format(name): h for name, h in states.items()})
        if self.model.training:
            local = output["completion_mask"].sum()
            self.generated_tokens += int(self.accelerator.gather(local.reshape(1)).sum().item())
        return output

    @torch.no_grad()
    def _reference_pass(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The one extra pass `beta == 0` costs: the backbone alone, adapter off, in micro-batch chunks."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P + T)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (B, P + T)
        chunk = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        model = self.accelerator.unwrap_model(self.model)
        backbone = _backbone(model)
        with (
            use_adapter(model, adapter_name=None),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._capture.arm() as capture,
        ):
            for start in range(0, input_ids.size(0), chunk):
                with self.accelerator.autocast():
                    backbone(
                        input_ids=input_ids[start : start + chunk],
                        attention_mask=attention_mask[start : start + chunk],
                        use_cache=False,
                    )
        return capture.completion_states(batch["completion_ids"].size(1))

    # ---- loss: weights between TRL's forward and its use of the advantages ----------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        role = self._pass_role()
        if role is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        with self._capture.arm() as capture:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        states = capture.completion_states(logits_to_keep)
        if role == "reference":
            self._ref_states = states
        else:
            inputs, self._loss_inputs = self._loss_inputs, None
            self._apply_credit(inputs, states)
        return result

    def _pass_role(self) -> str | None:
        """`policy` for the loss forward, `reference` for TRL's adapter-off pass, None for any other pass."""
        if self._loss_inputs is not None:
            return "policy"
        if self._capturing_reference and self._adapter_layer.disable_adapters:
            return "reference"
        return None

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        if self.credit.method in _FIXED_CREDIT:
            self._entropy_mask = None
            loss = super()._compute_loss(model, inputs)
            self._log_fixed_credit(inputs)
            return loss
        inputs = dict(inputs)  # a copy: with num_iterations > 1 the buffered batch is reused with (B,) advantages
        self._loss_inputs = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None

    def get_high_entropy_mask(self, entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
        self._entropy_mask = super().get_high_entropy_mask(entropies, mask, threshold)  # (B, T) bool
        return self._entropy_mask

    def _apply_credit(self, inputs: dict[str, Any], policy: dict[str, Tensor]) -> None:
        """Turn the loss forward's states into weights and set `inputs["advantages"]` to `A_i * w_i,t`."""
        c, method = self.credit, self.credit.method
        mask = _loss_mask(inputs)  # (B, T)
        ref = {name: inputs.get(REF_KEY.format(name)) for name in policy}
        lm_head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        saliences = signals_from_states(
            inputs["completion_ids"],
            mask,
            policy.get("final"),
            lm_head,
            ref.get("final"),
            policy_arca_hidden=policy.get("arca"),
            ref_arca_hidden=ref.get("arca"),
            names=(method,),
            temperature=self.temperature,
        )[method]  # (B, T)
        weights, fallback = normalize(
            saliences, mask, c.scheme, c.tau, c.eps, mix=c.mix, w_max=c.w_max, sharpening=c.sharpening
        )
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)  # (B, 1)
        inputs["advantages"] = advantages * weights.to(advantages.device)  # (B, T); w is built from detached states
        self.last_credit = {"saliences": saliences, "weights": weights, "fallback": fallback, "mask": mask}
        self._log_credit(weights, mask, fallback)

    # ---- diagnostics ----------------------------------------------------------------------------------------

    def _log_fixed_credit(self, inputs: dict[str, Any]) -> None:
        """Diagnostics of `uniform` (all ones) and `top_entropy` (TRL's mask, rescaled to mean 1 per row)."""
        mask = _loss_mask(inputs).float()  # (B, T)
        weights = mask
        if self._entropy_mask is not None:
            kept = self._entropy_mask.float() * mask  # (B, T)
            weights = kept * mask.sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp_min(1.0)
        self.last_credit = {"weights": weights, "fallback": torch.zeros(len(mask), dtype=torch.bool), "mask": mask}
        self._log_credit(weights, mask, self.last_credit["fallback"])

    def _log_credit(self, weights: Tensor, mask: Tensor, fallback: Tensor) -> None:
        """Append this micro-batch's means of `CREDIT_METRICS` (over every process) to TRL's metrics."""
        mode = "train" if self.model.training else "eval"
        etr = effective_token_ratio(weights, mask)  # (B,)
        labels = regime(etr, self.credit.etr_uniform, self.credit.etr_concentrated)  # (B,)
        has_tokens = np.asarray(mask.sum(1).cpu() > 0, dtype=np.float64)  # (B,) empty rows are not counted
        per_row = np.stack(
            [
                gini(weights, mask),
                etr,
                labels == "uniform",
                labels == "middle",
                labels == "concentrated",
                fallback.cpu().numpy(),
            ],
            axis=1,
        )  # (B, 6)
        local = np.concatenate([(per_row * has_tokens[:, None]).sum(0), [has_tokens.sum()]])  # (7,)
        device = self.accelerator.device
        totals = self.accelerator.gather(torch.as_tensor(local, dtype=torch.float64, device=device)[None])
        totals = totals.sum(0)  # (7,)
        means = (totals[:-1] / totals[-1].clamp_min(1.0)).tolist()
        max_weight = self.accelerator.gather(weights.detach().amax().reshape(1).float().to(device)).max().item()
        for name, value in zip(CREDIT_METRICS, [*means, max_weight]):
            self._metrics[mode][f"credit/{name}"].append(value)


def _loss_mask(inputs: dict[str, Any]) -> Tensor:
    """(B, T) mask of the tokens TRL's loss counts (completion tokens, minus tool output if any)."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]
