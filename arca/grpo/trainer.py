"""GRPO with per-token credit (SPEC section 4): TRL's `GRPOTrainer` with the advantage `A_i` of every token
scaled by a detached weight `w_i,t` with mean 1 per completion, computed from the forward passes TRL already runs.
The credit comes from `args` (`CreditGRPOConfig`'s `credit_*` fields).

The seams: `_compute_loss` (arms the hooks of `arca.grpo.capture` and builds the weights between TRL's loss forward and
the point where TRL reads the advantages, which it accepts as `(B, T)`), `_get_per_token_logps_and_entropies`
(routes TRL's passes), `get_high_entropy_mask` (`top_entropy`), `_generate_and_score_completions` (counts tokens,
carries `reuse` states), `_get_train_sampler` (resumable order) and `log` (noise probe). `uniform` goes through
TRL untouched: bit-identical to a plain `GRPOTrainer`. `top_entropy` takes TRL's high-entropy mask (top
`top_entropy_quantile` of the micro-batch's token entropies, all processes) as its salience, normalized like any
other (SPEC 3; with scheme `mean` a kept token weighs `T / k`, the others 0, and a row with no kept token falls
back to uniform), and TRL does not apply the mask again: the loss gets exactly the weights the log reports.

States: forward hooks keep the backbone's (or `credit_layer`'s) output while a pass of interest runs, since TRL's
fused LM head returns no hidden states; `arca_local` sums `||s B A x||` over LoRA layers (`arca.credit.lora_local`).

Exactness (SPEC 2b, `credit_reference: matched`, the default): the adapter-off pass runs inside `_compute_loss`
on exactly the loss micro-batch (the backbone alone at `beta = 0` unless a signal reads its log-probs), so LoRA
`B = 0` gives every reference-comparing salience exactly 0 in any dtype; logit signals take TRL's log-probs and
entropies where its head is float32; `reuse` takes TRL's generation-time pass (not exact in bf16); with dropout,
states come from one dropout-free pass. Logged: `arca.grpo.credit_log.CREDIT_METRICS`, and the bf16 noise probe.
The full account: docs/design.md ("Exact saliences in the trainer").

What it leaves out: docs/design.md ("Exact saliences in the trainer").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import RepeatSampler, maybe_gather_lm_head_ctx, use_adapter

from arca.credit.config import CreditConfig
from arca.credit.lora_local import LoraNormCapture
from arca.credit.normalize import normalize, permutation_seeds, permute_weights
from arca.credit.signals import (
    POLICY_STATS,
    REF_STATS,
    logit_map,
    needs_logits,
    needs_lora,
    needs_reference,
    signals_from_states,
    signals_read,
)
from arca.grpo.capture import (
    FORWARD_KEYS,
    StateCapture,
    backbone,
    eval_mode,
    has_dropout,
    layer_module,
    loss_mask,
    sequences,
    trl_head_is_exact,
)
from arca.grpo.config import CreditGRPOConfig, check_setup, trainer_credit
from arca.grpo.credit_log import CREDIT_METRICS, credit_means
from arca.grpo.noise_probe import NOISE_SIGNALS, NoiseProbe
from arca.grpo.sampler import EpochSeededRepeatSampler
from arca.sampling.merged import sync_merged_copies

__all__ = ["CREDIT_METRICS", "GIVEN_KEY", "NOISE_SIGNALS", "REF_KEY", "CreditGRPOTrainer"]

# Batch keys holding adapter-off states (B, T, H), one per state source ("final" and/or "arca").
REF_KEY = "credit_ref_{}"
# Batch keys of the adapter-off per-token statistics TRL's matched pass yields (`ref_logp`, `ref_entropy`).
GIVEN_KEY = "credit_given_{}"
# Key of the matched adapter-off result cached in TRL's buffered micro-batch (num_iterations > 1).
_MATCHED_CACHE = "credit_matched_reference"
_STATELESS = ("uniform", "top_entropy")  # methods whose weights need no captured states


class CreditGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose per-token advantage is `A_i * w_i,t`, with `w` from `args.credit` (SPEC sections 2-4).

    Args:
        model, reward_funcs, *rest, **kwargs: as for `trl.GRPOTrainer`. Pass the base model with `peft_config=`:
            with an already wrapped `PeftModel` and `beta != 0`, TRL's reference is a frozen adapter copy, not the
            base model.
        args: a `CreditGRPOConfig`; None = its defaults (`credit_method="arca"`).
        credit: deprecated, only next to a plain `GRPOConfig` (whose `top_entropy_quantile` must then match).

    Attributes:
        credit: the run's `CreditConfig` (`args.credit`).
        generated_tokens: completion tokens generated so far in training (sum of completion masks, all
            processes); the caller restores it when resuming.
        last_credit: the last micro-batch's `saliences`, `weights` (B, T), `fallback` (B,) and `mask`.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "arca"]

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        args: CreditGRPOConfig | None = None,
        *rest: Any,
        credit: CreditConfig | None = None,
        **kwargs: Any,
    ):
        args, self.credit = trainer_credit(model, args, credit)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self.generated_tokens = 0
        self.last_credit: dict[str, Tensor] | None = None
        method = self.credit.method
        stateless = method in _STATELESS
        self._needs_reference = not stateless and needs_reference((method,))
        self._needs_states = not stateless and (self._needs_reference or needs_logits((method,)))  # hooked states
        self._needs_lora = not stateless and needs_lora((method,))
        self._matched = self._needs_reference and self.credit.reference == "matched"
        self._loss_inputs: dict[str, Any] | None = None  # the batch whose advantages the loss forward sets
        self._entropy_inputs: dict[str, Any] | None = None  # the same for `top_entropy`'s mask
        self._in_generation = False
        self._ref_states: dict[str, Tensor] | None = None
        check_setup(
            self.credit,
            self.args.top_entropy_quantile,
            self.accelerator.unwrap_model(self.model),
            self._needs_reference,
            self._needs_lora,
        )
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._capture = StateCapture(self._state_sources()) if self._needs_states else None
        self._lora_capture = LoraNormCapture(unwrapped) if self._needs_lora else None
        if self._needs_reference:
            self._adapter_layer = next(m for m in unwrapped.modules() if isinstance(m, BaseTunerLayer))
        self._logit_map = logit_map(unwrapped)
        # TRL's per-token log-prob and entropy are SPEC 2's where its fused head computes in float32 with the same
        # output map: then they replace a side of the vocab sweep. A comparing signal takes both sides from TRL
        # or neither, so `B = 0` still gives exactly 0 (docs/design.md, "Statistics from TRL's passes").
        reads = signals_read((method,)) if not stateless else set()
        exact_head = trl_head_is_exact(unwrapped, self.args.cast_lm_head_to_fp32, self.accelerator.mixed_precision)
        self._given_ref = exact_head and self._matched and bool(reads & set(REF_STATS))
        self._given_policy = (
            exact_head and bool(reads & set(POLICY_STATS)) and (self._given_ref or not self._needs_reference)
        )
        # A random training forward (dropout) must not feed the salience: it gets its own dropout-free pass.
        self._dropout_free_pass = (
            (self._needs_states or self._needs_lora) and not self.credit.salience_dropout and has_dropout(unwrapped)
        )
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        self._noise = NoiseProbe(unwrapped, self.accelerator, self.credit.layer, self.temperature, sharded)
        self._sync_merged_copies()

    def _sync_merged_copies(self) -> None:
        """`use_vllm`: vLLM gets `W + s B A` copies, never TRL's in-place bf16 merge/unmerge (`arca.sampling.merged`);
        sharded weights (ZeRO-3, FSDP) keep TRL's path, since a copy needs the whole weight."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        zero3 = self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3
        if getattr(self, "vllm_generation", None) is not None and not (self.is_fsdp_enabled or zero3):
            sync_merged_copies(self.vllm_generation, lambda: self.accelerator.unwrap_model(self.model))

    def _state_sources(self) -> dict[str, nn.Module]:
        """Which modules' outputs the method reads: `final` for logits signals, `arca` for the residual."""
        decoder = backbone(self.accelerator.unwrap_model(self.model))
        if self.credit.method == "arca":
            return {"arca": layer_module(decoder, self.credit.layer)}
        return {"final": decoder}

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

    def _get_train_sampler(self, dataset=None) -> RepeatSampler:
        return EpochSeededRepeatSampler.for_trainer(self, dataset)

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
        input_ids, attention_mask, num_tokens = sequences(batch)  # (B, P + T) each
        chunk = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        model = self.accelerator.unwrap_model(self.model)
        decoder = backbone(model)
        with (
            use_adapter(model, adapter_name=None),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._capture.arm() as capture,
        ):
            for start in range(0, input_ids.size(0), chunk):
                with self.accelerator.autocast():
                    decoder(
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
            if self._given_policy and result[1] is not None:  # TRL's loss forward computes entropies
                captured.update(logp=result[0].detach(), entropy=result[1].detach())
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
        if self.model.training:
            self._noise.keep(inputs)
        if self.credit.method == "uniform":
            loss = super()._compute_loss(model, inputs)
            self._log_uniform_credit(inputs)
            return loss
        batch, inputs = inputs, dict(inputs)  # a copy: with num_iterations > 1 the buffered batch is reused
        if self.credit.method == "top_entropy":
            self._entropy_inputs = inputs  # `get_high_entropy_mask` sets its advantages
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._entropy_inputs = None
        if self._matched:
            inputs.update(self._matched_reference(model, batch))
        if self._dropout_free_pass and self.model.training:
            policy, stats = self._salience_pass(model, inputs, adapter=True, head=self._given_policy)
            policy.update({k: stats[k] for k in POLICY_STATS} if self._given_policy else {})
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
        states, stats = self._salience_pass(model, batch, adapter=False, head=self.beta != 0.0 or self._given_ref)
        reference: dict[str, Tensor] = {REF_KEY.format(name): h for name, h in states.items()}
        if self._given_ref:
            reference.update({GIVEN_KEY.format(k): stats[k] for k in REF_STATS})
        if self.beta != 0.0:
            reference["ref_per_token_logps"] = stats["ref_logp"]  # (B, T)
        if self.num_iterations > 1:
            batch[_MATCHED_CACHE] = reference
        return reference

    @torch.no_grad()
    def _salience_pass(
        self, model: nn.Module, batch: dict[str, Any], adapter: bool, head: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One no-grad pass over exactly `batch` (adapter on or off, eval mode, one chunk, the loss forward's
        tensors): the captured states (`_captured`), and with `head` (TRL's function, always for vision inputs and
        FSDP, whose root owns parameters the backbone needs) the (B, T) `logp`, `entropy` (`ref_` prefixed with
        the adapter off); without it the backbone alone, as TRL's fused head runs it (no vocabulary)."""
        input_ids, attention_mask, num_tokens = sequences(batch)
        unwrapped = self.accelerator.unwrap_model(self.model)
        extra = {k: batch.get(k) for k in FORWARD_KEYS}
        head = head or self.is_fsdp_enabled or any(v is not None for v in extra.values())
        stats: dict[str, Tensor] = {}
        with (
            nullcontext() if adapter else use_adapter(unwrapped, adapter_name=None),
            eval_mode(self.model),
            self._captured(num_tokens) as states,
        ):
            if head:
                logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, num_tokens, compute_entropy=True, **extra
                )
                prefix = "" if adapter else "ref_"
                stats = {f"{prefix}logp": logps, f"{prefix}entropy": entropies}
            else:
                with self.accelerator.autocast():
                    backbone(unwrapped)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return states, stats

    def get_high_entropy_mask(self, entropies: Tensor, mask: Tensor, threshold: float) -> Tensor | None:
        kept = super().get_high_entropy_mask(entropies, mask, threshold)  # (B, T) bool
        if self._entropy_inputs is None:
            return kept
        self._set_weights(self._entropy_inputs, kept.float())  # salience 1 on kept tokens, 0 elsewhere
        return None  # the mask is in the weights: TRL must not apply it to the loss a second time

    def _apply_credit(self, inputs: dict[str, Any], policy: dict[str, Tensor]) -> None:
        """Turn the adapter-on states (`final`/`arca` (B, T, H), `lora` (B, T)) and the batch's adapter-off states
        into saliences, and the saliences into the batch's per-token advantages (`_set_weights`)."""
        method = self.credit.method
        ref = {name: inputs.get(REF_KEY.format(name)) for name in ("final", "arca")}
        given = {k: policy[k] for k in POLICY_STATS if k in policy}
        given.update({k: inputs[GIVEN_KEY.format(k)] for k in REF_STATS if GIVEN_KEY.format(k) in inputs})
        lm_head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        saliences = signals_from_states(
            inputs["completion_ids"],
            loss_mask(inputs),
            policy.get("final"),
            lm_head,
            ref["final"],
            policy_arca_hidden=policy.get("arca"),
            ref_arca_hidden=ref["arca"],
            lora_norms=policy.get("lora"),
            to_logits=self._logit_map,
            names=(method,),
            temperature=self.temperature,
            gather_head=maybe_gather_lm_head_ctx,  # ZeRO-3 shards the head
            given=given,
        )[method]  # (B, T)
        self._set_weights(inputs, saliences)

    def _set_weights(self, inputs: dict[str, Any], saliences: Tensor) -> None:
        """Normalize (B, T) `saliences` (SPEC 3), permute them with `credit.permute`, and set
        `inputs["advantages"]` to `A_i * w_i,t` (SPEC 4)."""
        mask = loss_mask(inputs)  # (B, T)
        weights, fallback = normalize(saliences, mask, **self.credit.normalization())
        if self.credit.permute:  # seeded by the run seed, the optimizer step and each row's tokens (every process)
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)  # (B, P + T)
            rows = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)  # (B, P + T)
            seeds = permutation_seeds(self.args.seed, self.state.global_step, ids, rows)  # (B,)
            weights = permute_weights(weights, mask, seeds)
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)  # (B, 1)
        inputs["advantages"] = advantages * weights.to(advantages.device)  # (B, T); w is built from detached states
        self.last_credit = {"saliences": saliences, "weights": weights, "fallback": fallback, "mask": mask}
        self._log_credit(weights, mask, fallback)

    # ---- diagnostics ----------------------------------------------------------------------------------------

    def _log_uniform_credit(self, inputs: dict[str, Any]) -> None:
        """Diagnostics of `uniform`: all-ones weights on the loss tokens, no fallback."""
        mask = loss_mask(inputs).float()  # (B, T)
        self.last_credit = {"weights": mask, "fallback": torch.zeros(len(mask), dtype=torch.bool), "mask": mask}
        self._log_credit(mask, mask, self.last_credit["fallback"])

    def _log_credit(self, weights: Tensor, mask: Tensor, fallback: Tensor) -> None:
        """Append this micro-batch's means of `CREDIT_METRICS` (over every process) to TRL's metrics."""
        means = credit_means(weights, mask, fallback, self.accelerator.gather, self.accelerator.device)
        for name, value in means.items():
            self._metrics["train" if self.model.training else "eval"][f"credit/{name}"].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:  # a training logging step: the running noise estimate
            for name, value in self._noise.measure().items():
                self._metrics["train"][f"credit/{name}"].append(value)
        super().log(logs, start_time)
