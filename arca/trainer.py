"""GRPO with per-token credit (SPEC section 4): TRL's `GRPOTrainer` with the advantage `A_i` of every token
scaled by a detached weight `w_i,t`, computed from the forward passes TRL already runs.

Where the states come from: TRL's fused LM head never returns logits or hidden states, so forward hooks on the
backbone (or on the decoder layer `credit.layer` picks) keep its output while a pass of interest runs, and
hooks on every LoRA layer add up `||s B A x||` for `arca_local` (`arca.lora_local`, read from each layer's
input before dropout). The adapter-on states come from the training forward of `_compute_loss`; the weights
are built between that forward and the point where TRL reads the advantages, and put back into the batch as
`(B, T)` advantages, which TRL's loss accepts. `uniform` goes through TRL untouched (bit-identical to a plain
`GRPOTrainer`); `top_entropy` is TRL's own `top_entropy_quantile` mask.

Exactness (SPEC 2b). A reference-comparing salience (`arca`, `kl`, `entropy_reduction`, `divergence`) subtracts
an adapter-on and an adapter-off pass; in bfloat16 any difference between the two passes besides the adapter
(other rows in a chunk, other padding, dropout) is rounding noise as large as the signal. `credit.reference`:
- `matched` (default, exact): the adapter-off pass runs inside `_compute_loss` on exactly the loss micro-batch,
  through the TRL function the loss forward uses (same tensors, one chunk, eval mode, no grad), so with LoRA
  `B = 0` every such salience is exactly 0 in any dtype. TRL's generation-time reference call is
  short-circuited and `ref_per_token_logps` (the KL penalty's input, read only in `_compute_loss`) comes from
  the matched pass: zero extra passes at `beta > 0`, one per micro-batch at `beta = 0`. With
  `num_iterations > 1` the matched result of the first iteration is cached in TRL's buffered micro-batch and
  reused: the base weights are frozen, so recomputing it would give the same bits.
- `reuse` (not exact): TRL's generation-time reference pass at `beta > 0` (chunks of other rows, shuffled
  afterwards), one extra backbone pass per micro-batch over the generation batch at `beta = 0`.
Dropout: when the model has any (LoRA dropout > 0 and TRL's `disable_dropout` off), the training forward is
random. Unless `credit.salience_dropout` (the paper's code, for fidelity only), every non-fixed method then
takes its adapter-on states from one extra no-grad pass in eval mode on the same micro-batch (the cost of a
forward without backward), so a batch's weights do not depend on the dropout draw. `arca_local` too: its hooks
read each LoRA layer's input before that layer's dropout, but the dropout of every earlier layer is in it.

Noise in the training log: in a run whose weights (or autocast) are not float32, every logging step scores a
fixed probe (the first `PROBE_ROWS` sequences of the first training micro-batch) with `compute_signals` in the
run's precision and in float32 (`float32_weights`), and logs `credit/noise_<s>` (noise share) and
`credit/noise_rank_<s>` (rank correlation with float32) for every signal in `NOISE_SIGNALS`: four forwards of
two sequences and an in-place upcast of the frozen weights per logging step, outside the training passes.

Left out: a non-PEFT policy (the reference must be the same weights under `disable_adapter()`), vision inputs
in the `reuse` extra pass at `beta = 0`, the weights' effect on TRL's entropy bonus (which is unweighted), and
the noise probe under ZeRO/FSDP (the in-place upcast needs whole weights); the probe is per process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import RepeatSampler, use_adapter

from arca.credit import normalize
from arca.credit_config import CreditConfig
from arca.diagnostics import effective_token_ratio, gini, regime
from arca.lora_local import LoraNormCapture
from arca.precision import float32_weights, noise_share, rank_correlation
from arca.signals import (
    SIGNAL_NAMES,
    compute_signals,
    logit_map,
    needs_logits,
    needs_lora,
    needs_reference,
    precision_sensitive,
    signals_from_states,
)

logger = logging.getLogger(__name__)

# Metrics added to TRL's log (as `credit/<name>`), means over the trajectories of each logging window.
CREDIT_METRICS = ("gini", "etr", "frac_uniform", "frac_middle", "frac_concentrated", "fallback_rate", "max_weight")
# Signals whose bf16 rounding noise the training log reports (`credit/noise_<s>`, `credit/noise_rank_<s>`).
NOISE_SIGNALS: tuple[str, ...] = tuple(precision_sensitive(SIGNAL_NAMES))
PROBE_ROWS = 2  # sequences in the noise probe: enough for a rank correlation, cheap next to a step
# Batch keys holding adapter-off states (B, T, H), one per state source ("final" and/or "arca").
REF_KEY = "credit_ref_{}"
# Key of the matched adapter-off result cached in TRL's buffered micro-batch (num_iterations > 1).
_MATCHED_CACHE = "credit_matched_reference"
_FIXED_CREDIT = ("uniform", "top_entropy")  # methods whose weights need no captured states
# Batch keys TRL's `_compute_loss` passes to the model besides ids and masks (vision inputs).
_FORWARD_KEYS = (
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


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) inside the block; each module's own mode is restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _has_dropout(model: nn.Module) -> bool:
    """Whether a train-mode forward of `model` is random: a dropout module with p > 0 (LoRA dropout included,
    unless TRL's `disable_dropout` zeroed it) or an attention dropout in the config."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    return float(getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0) > 0


def _low_precision(model: nn.Module, accelerator: Accelerator) -> bool:
    """Whether the run computes below float32: non-float32 floating weights, or mixed-precision autocast."""
    if accelerator.mixed_precision in ("bf16", "fp16"):
        return True
    return any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())


def _sequences(batch: dict[str, Any]) -> tuple[Tensor, Tensor, int]:
    """(input_ids (B, P + T), attention_mask (B, P + T), T) of a micro-batch, built as TRL's `_compute_loss` does."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask, batch["completion_ids"].size(1)


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
        credit: the method, its normalization, how the adapter-off states are obtained (`reference`) and
            whether LoRA dropout may reach the salience (`salience_dropout`); see the module docstring. For
            `top_entropy`, `args.top_entropy_quantile` must equal `credit.top_entropy_quantile`; for every
            other method it must stay 1.0.

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
        names, fixed = (credit.method,), credit.method in _FIXED_CREDIT
        self._needs_reference = not fixed and needs_reference(names)
        self._needs_states = not fixed and (self._needs_reference or needs_logits(names))  # hooked hidden states
        self._needs_lora = not fixed and needs_lora(names)
        self._matched = self._needs_reference and credit.reference == "matched"
        self._loss_inputs: dict[str, Any] | None = None  # the batch whose advantages the loss forward sets
        self._in_generation = False
        self._ref_states: dict[str, Tensor] | None = None
        self._check_setup()
        model = self.accelerator.unwrap_model(self.model)
        self._capture = _StateCapture(self._state_sources()) if self._needs_states else None
        self._lora_capture = LoraNormCapture(model) if self._needs_lora else None
        if self._needs_reference:
            self._adapter_layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
        self._logit_map = logit_map(model)
        # A random training forward (dropout) must not feed the salience: it gets its own dropout-free pass.
        self._dropout_free_pass = (
            (self._needs_states or self._needs_lora) and not credit.salience_dropout and _has_dropout(model)
        )
        self._noise_probe = (
            isinstance(model, PeftModel)
            and _low_precision(model, self.accelerator)
            and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        )
        self._probe: tuple[Tensor, Tensor, Tensor] | None = None  # input_ids, attention_mask, completion_mask

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
        if not (self._needs_reference or self._needs_lora):
            return
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "disable_adapter"):
            raise ValueError(f"model: method {method!r} needs the LoRA adapter; pass peft_config=LoraConfig(...)")
        if self._needs_reference and "ref" in model.peft_config:
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

    @contextmanager
    def _captured(self, num_tokens: int) -> Iterator[dict[str, Tensor]]:
        """Arm the method's hooks for the passes run inside the block. On exit the yielded dict holds the (B, T, H)
        states (`final` or `arca`) and/or the (B, T) LoRA norms (`lora`) at the positions predicting the last
        `num_tokens` tokens, chunks concatenated along the batch."""
        captured: dict[str, Tensor] = {}
        with ExitStack() as stack:
            if self._capture is not None:
                stack.enter_context(self._capture.arm())
            if self._lora_capture is not None:
                stack.enter_context(self._lora_capture.arm(num_tokens))
            yield captured
        if self._capture is not None:
            captured.update(self._capture.completion_states(num_tokens))
        if self._lora_capture is not None:
            captured["lora"] = self._lora_capture.norms()

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

    # ---- generation: in `reuse` mode the adapter-off states ride along with the batch -----------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._in_generation, self._ref_states = True, None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._in_generation = False
        if self._needs_reference and not self._matched:
            states = self._ref_states if self.beta != 0.0 else self._reference_pass(output)
            self._ref_states = None
            if states is None:
                raise RuntimeError("credit: TRL's reference pass (beta != 0) was not captured")
            # First dim = batch, so TRL shuffles and splits them with everything else.
            output.update({REF_KEY.format(name): h for name, h in states.items()})
        if self.model.training:
            local = output["completion_mask"].sum()
            self.generated_tokens += int(self.accelerator.gather(local.reshape(1)).sum().item())
        return output

    @torch.no_grad()
    def _reference_pass(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The extra pass `reuse` costs at `beta == 0`: the backbone alone, adapter off, in micro-batch chunks."""
        input_ids, attention_mask, num_tokens = _sequences(batch)  # (B, P + T) each
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
        return capture.completion_states(num_tokens)

    # ---- loss: weights between TRL's forward and its use of the advantages ----------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        role = self._pass_role()
        if role == "reference" and self._matched:
            # TRL's generation-time reference pass is replaced by the matched one in `_compute_loss`; without a
            # value TRL leaves `ref_per_token_logps` out of the batch.
            return None, None, None
        if role is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        with self._captured(logits_to_keep) as captured:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        if role == "reference":
            self._ref_states = captured
        else:
            inputs, self._loss_inputs = self._loss_inputs, None
            self._apply_credit(inputs, captured)
        return result

    def _pass_role(self) -> str | None:
        """`policy` for the loss forward whose states set the weights, `reference` for TRL's generation-time
        adapter-off pass (kept by `reuse`, skipped by `matched`), None for any other pass."""
        if self._loss_inputs is not None:
            return "policy"
        if self._in_generation and self._needs_reference and self._adapter_layer.disable_adapters:
            return "reference"
        return None

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        self._keep_probe(inputs)
        if self.credit.method in _FIXED_CREDIT:
            self._entropy_mask = None
            loss = super()._compute_loss(model, inputs)
            self._log_fixed_credit(inputs)
            return loss
        batch, inputs = inputs, dict(inputs)  # a copy: with num_iterations > 1 the buffered batch is reused
        if self._matched:
            inputs.update(self._matched_reference(model, batch))
        if self._dropout_free_pass and self.model.training:
            policy, _ = self._salience_pass(model, inputs, adapter=True)
            self._apply_credit(inputs, policy)
            return super()._compute_loss(model, inputs)
        self._loss_inputs = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None

    def _matched_reference(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The adapter-off states (`REF_KEY`) of exactly this micro-batch, plus TRL's `ref_per_token_logps` when
        `beta != 0`. Cached in `batch` when TRL reuses it (`num_iterations > 1`): the base weights are frozen,
        so the same tensors give the same adapter-off pass at every iteration."""
        if _MATCHED_CACHE in batch:
            return batch[_MATCHED_CACHE]
        states, ref_logps = self._salience_pass(model, batch, adapter=False)
        reference: dict[str, Tensor] = {REF_KEY.format(name): h for name, h in states.items()}
        if self.beta != 0.0:
            reference["ref_per_token_logps"] = ref_logps  # (B, T)
        if self.num_iterations > 1:
            batch[_MATCHED_CACHE] = reference
        return reference

    @torch.no_grad()
    def _salience_pass(
        self, model: nn.Module, batch: dict[str, Any], adapter: bool
    ) -> tuple[dict[str, Tensor], Tensor]:
        """One no-grad pass over exactly `batch`, adapter on or off, through the TRL function the loss forward
        uses (one chunk, same tensors), in eval mode (no dropout).

        Returns:
            The captured states (see `_captured`) and the per-token log-probs (B, T) of the completion tokens.
        """
        input_ids, attention_mask, num_tokens = _sequences(batch)
        unwrapped = self.accelerator.unwrap_model(self.model)
        with (
            nullcontext() if adapter else use_adapter(unwrapped, adapter_name=None),
            _eval_mode(self.model),
            self._captured(num_tokens) as states,
        ):
            logps, _, _ = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, num_tokens, **{k: batch.get(k) for k in _FORWARD_KEYS}
            )
        return states, logps

    def get_high_entropy_mask(self, entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
        self._entropy_mask = super().get_high_entropy_mask(entropies, mask, threshold)  # (B, T) bool
        return self._entropy_mask

    def _apply_credit(self, inputs: dict[str, Any], policy: dict[str, Tensor]) -> None:
        """Turn the adapter-on states (`final`/`arca` (B, T, H), `lora` (B, T)) and the batch's adapter-off states
        into weights, and set `inputs["advantages"]` to `A_i * w_i,t`."""
        c, method = self.credit, self.credit.method
        mask = _loss_mask(inputs)  # (B, T)
        ref = {name: inputs.get(REF_KEY.format(name)) for name in ("final", "arca")}
        lm_head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        saliences = signals_from_states(
            inputs["completion_ids"],
            mask,
            policy.get("final"),
            lm_head,
            ref["final"],
            policy_arca_hidden=policy.get("arca"),
            ref_arca_hidden=ref["arca"],
            lora_norms=policy.get("lora"),
            to_logits=self._logit_map,
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

    # ---- running noise estimate (SPEC 2b), on logging steps only ---------------------------------------------

    def _keep_probe(self, inputs: dict[str, Any]) -> None:
        """Keep the first `PROBE_ROWS` sequences of the first training micro-batch as the fixed noise probe."""
        if not self._noise_probe or self._probe is not None or not self.model.training:
            return
        input_ids, attention_mask, _ = _sequences(inputs)  # (B, P + T) each
        scored = torch.cat([torch.zeros_like(inputs["prompt_mask"]), _loss_mask(inputs)], dim=1)  # (B, P + T)
        rows = slice(0, PROBE_ROWS)
        self._probe = (input_ids[rows].clone(), attention_mask[rows].clone(), scored[rows].clone())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._probe is not None and self.model.training and "loss" in logs:  # a training logging step
            for name, value in self._probe_noise().items():
                self._metrics["train"][f"credit/{name}"].append(value)
        super().log(logs, start_time)

    def _probe_noise(self) -> dict[str, float]:
        """`noise_<s>` (`||a - a32|| / ||a32||`) and `noise_rank_<s>` (rank correlation of `a` with `a32`) of each
        `NOISE_SIGNALS` on the probe, `a` scored in the run's precision and `a32` with float32 weights."""
        model = self.accelerator.unwrap_model(self.model)
        input_ids, attention_mask, scored = self._probe
        score = functools.partial(
            compute_signals,
            model,
            input_ids,
            attention_mask,
            scored,
            layer=self.credit.layer,
            names=NOISE_SIGNALS,
            temperature=self.temperature,
        )  # eval mode, no grad; every module's mode is restored
        with self.accelerator.autocast():
            low = score()  # name -> (PROBE_ROWS, P + T)
        with float32_weights(model):
            exact = score()
        mask = (scored != 0) & (attention_mask != 0)
        noise = {}
        for name in NOISE_SIGNALS:
            noise[f"noise_{name}"] = noise_share(low[name], exact[name], mask)
            noise[f"noise_rank_{name}"] = rank_correlation(low[name], exact[name], mask)
        return noise


def _loss_mask(inputs: dict[str, Any]) -> Tensor:
    """(B, T) mask of the tokens TRL's loss counts (completion tokens, minus tool output if any)."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]
