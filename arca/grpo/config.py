"""`CreditGRPOConfig`: TRL's `GRPOConfig` plus the `credit_*` fields of per-token credit (SPEC 2-4), the way TRL
ships its own variants (`GMPOConfig(GRPOConfig)`), so `TrlParser` and YAML recipes hold a whole ARCA run."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig
from trl.trainer.utils import get_config_model_id

from arca.credit.config import METHODS, REFERENCE_MODES, CreditConfig, CreditConfigError
from arca.methods import FALLBACKS, SCHEMES

logger = logging.getLogger(__name__)

REPORT_TO_ENV = "ARCA_REPORT_TO"  # comma-separated TRL `report_to` values; unset or empty = none
TOP_ENTROPY_DEFAULT = 0.2  # the 20% "forking tokens" of Wang et al. (2025)
# `CreditConfig` field -> the `CreditGRPOConfig` argument that sets it (errors name the argument).
ARGUMENTS = {
    name: name if name == "top_entropy_quantile" else f"credit_{name}" for name in CreditConfig.__dataclass_fields__
}


@dataclass
class CreditGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`arca.CreditGRPOTrainer`]: every [`GRPOConfig`] parameter, plus how each token's
    advantage `A_i` is scaled by a detached weight `w_i,t` with mean 1 per completion (SPEC sections 2-4).

    Parameters:
        credit_method (`str`, *optional*, defaults to `"arca"`):
            Salience signal, one of `arca.credit.config.METHODS`. `uniform` is vanilla GRPO, bit for bit.
            `top_entropy` keeps the tokens in the top `top_entropy_quantile` by entropy (TRL's mask, set to
            0.2 when left at 1.0), at mean weight 1 like every other method.
        credit_scheme (`str`, *optional*, defaults to `"mean"`):
            Normalization within a completion: `mean` (`a / mean(a)`), `softmax` (`T * softmax(a / tau)`) or
            `rank`.
        credit_tau (`float`, *optional*, defaults to `1.0`):
            Softmax temperature (scheme `softmax` only), > 0.
        credit_mix (`float`, *optional*, defaults to `1.0`):
            Lambda of `w <- (1 - lambda) + lambda * w`, in [0, 1]; 0 is vanilla GRPO.
        credit_w_max (`float` or `None`, *optional*, defaults to `None`):
            Cap on a weight (>= 1), followed by renormalization to mean 1; `None` = no cap.
        credit_layer (`int`, *optional*, defaults to `-1`):
            HF `hidden_states` index of ARCA's residual; -1 = the final (post-norm) state the LM head reads.
        credit_sharpening (`float`, *optional*, defaults to `1.0`):
            Exponent p of `(a + eps)^p` before normalization; 1 = off, the ARCA paper's code uses 2.
        credit_eps (`float`, *optional*, defaults to `1e-8`):
            A completion whose salience mass is `<= eps * T` falls back to uniform weights (ARCA at step 0).
        credit_reference (`str`, *optional*, defaults to `"matched"`):
            Adapter-off states from one pass on exactly the loss micro-batch (`matched`, exact in bf16, no extra
            pass at `beta > 0`) or from TRL's generation-time reference pass (`reuse`, not exact in bf16).
        credit_salience_dropout (`bool`, *optional*, defaults to `False`):
            Keep LoRA dropout in the pass that feeds the salience, as the ARCA paper's code does (for
            reproducing it only; otherwise a dropout-free pass feeds it).
        credit_fallback (`str`, *optional*, defaults to `"raw_mean"`):
            Which completions fall back to uniform weights: `raw_mean` (`sum(a) <= eps * T` on the raw saliences,
            SPEC 3) or `sharpened_sum` (`sum (a + eps)^p <= eps` on the sharpened scores, the ARCA paper's code).
        credit_permute (`bool`, *optional*, defaults to `False`):
            The permutation control: after normalization, permute each completion's weights uniformly at random
            over its valid tokens (seeded by `seed`, the optimizer step and the completion's tokens; see
            `arca.credit.normalize.permutation_seeds`). Keeps the signal's concentration, loses its positions.
        report_to (`str`, `list[str]` or `None`, *optional*, defaults to `None`):
            TRL's `report_to`; left unset, it comes from `$ARCA_REPORT_TO` (`report_to_from_env`: comma-separated,
            e.g. `tensorboard,wandb`; unset = `"none"`), so a tracker can watch a run without a code change.
    """

    credit_method: str = field(
        default="arca",
        metadata={"help": "Salience signal; uniform is vanilla GRPO.", "choices": list(METHODS)},
    )
    credit_scheme: str = field(
        default="mean",
        metadata={"help": "Normalization of the saliences within a completion.", "choices": list(SCHEMES)},
    )
    credit_tau: float = field(default=1.0, metadata={"help": "Softmax temperature (scheme softmax), > 0."})
    credit_mix: float = field(
        default=1.0, metadata={"help": "Mix with uniform credit, w <- (1 - mix) + mix * w, in [0, 1]."}
    )
    credit_w_max: float | None = field(
        default=None, metadata={"help": "Cap on a weight (>= 1), then renormalized to mean 1; unset = no cap."}
    )
    credit_layer: int = field(
        default=-1, metadata={"help": "hidden_states index of ARCA's residual; -1 = final (post-norm)."}
    )
    credit_sharpening: float = field(
        default=1.0, metadata={"help": "Exponent p of (a + eps)^p before normalization; 1 = off."}
    )
    credit_eps: float = field(
        default=1e-8, metadata={"help": "A completion with salience mass <= eps * T gets uniform weights."}
    )
    credit_reference: str = field(
        default="matched",
        metadata={"help": "Where adapter-off states come from; matched is exact.", "choices": list(REFERENCE_MODES)},
    )
    credit_salience_dropout: bool = field(
        default=False, metadata={"help": "Keep LoRA dropout in the salience pass (the ARCA paper's code does)."}
    )
    credit_fallback: str = field(
        default="raw_mean",
        metadata={"help": "Fallback test: raw saliences (raw_mean) or sharpened scores.", "choices": list(FALLBACKS)},
    )
    credit_permute: bool = field(
        default=False, metadata={"help": "Permute each completion's weights over its tokens (the control)."}
    )
    # TRL's field with None for "not given": then $ARCA_REPORT_TO decides, where TrainingArguments says "none".
    report_to: None | str | list[str] = field(  # noqa: RUF036  (TRL's order: its parser needs None first)
        default=None,
        metadata={"help": "Trackers (TRL's report_to); unset: $ARCA_REPORT_TO (comma-separated), else none."},
    )

    def __post_init__(self) -> None:
        if self.credit_method == "top_entropy" and self.top_entropy_quantile == 1.0:
            logger.info("credit_method=top_entropy: top_entropy_quantile set to %s", TOP_ENTROPY_DEFAULT)
            self.top_entropy_quantile = TOP_ENTROPY_DEFAULT
        if self.credit_method != "top_entropy" and self.top_entropy_quantile != 1.0:
            raise ValueError(
                f"top_entropy_quantile: would mask tokens on top of credit_method {self.credit_method!r}; leave it "
                f"at 1.0 (credit_method='top_entropy' sets it), got {self.top_entropy_quantile!r}"
            )
        self.credit  # noqa: B018  (validates every credit_* field now, not at the first step)
        if self.report_to is None:
            self.report_to = report_to_from_env()
        super().__post_init__()

    @property
    def credit(self) -> CreditConfig:
        """The credit fields as the trainer's value object (validated; errors name the `credit_*` argument)."""
        # The quantile is TRL's field; it is a credit knob only for `top_entropy` (else CreditConfig's default).
        quantile = {"top_entropy_quantile": self.top_entropy_quantile} if self.credit_method == "top_entropy" else {}
        try:
            return CreditConfig(
                method=self.credit_method,
                scheme=self.credit_scheme,
                tau=self.credit_tau,
                mix=self.credit_mix,
                w_max=self.credit_w_max,
                layer=self.credit_layer,
                eps=self.credit_eps,
                **quantile,
                sharpening=self.credit_sharpening,
                reference=self.credit_reference,
                salience_dropout=self.credit_salience_dropout,
                fallback=self.credit_fallback,
                permute=self.credit_permute,
            )
        except CreditConfigError as err:
            raise err.renamed(ARGUMENTS[err.field]) from None


def report_to_from_env(environ: Mapping[str, str] | None = None) -> str | list[str]:
    """TRL's `report_to` from `$ARCA_REPORT_TO`: `"none"` when unset or empty, `"all"`, or the listed trackers.

    A tracker only watches: it is in no params hash, run fingerprint or DVC dependency, so setting it retrains
    nothing. Checked here, before any model loads: an unknown name lists the known ones, a tracker whose package
    is missing says so (transformers would only fail at the trainer's construction).

    Args:
        environ: the environment to read; None = `os.environ`.
    """
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    raw = (os.environ if environ is None else environ).get(REPORT_TO_ENV, "")
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if names in ([], ["none"]):
        return "none"
    if names == ["all"]:
        return "all"
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ValueError(
            f"{REPORT_TO_ENV}={raw!r}: unknown tracker(s) {unknown}; give a comma-separated list of "
            f"{sorted(INTEGRATION_TO_CALLBACK)}, or all, or none"
        )
    available = get_available_reporting_integrations()
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(
            f"{REPORT_TO_ENV}={raw!r}: {missing} not installed in this environment (installed trackers: "
            f"{available or 'none'}); pip install the tracker's package or unset {REPORT_TO_ENV}"
        )
    return list(dict.fromkeys(names))  # each once, in the given order


def credit_arguments(credit: CreditConfig) -> dict[str, Any]:
    """The `CreditGRPOConfig` keyword arguments that reproduce `credit` (`top_entropy_quantile` included), for
    code that builds its credit as a `CreditConfig` first: `CreditGRPOConfig(..., **credit_arguments(credit))`."""
    arguments = {ARGUMENTS[name]: getattr(credit, name) for name in ARGUMENTS}
    if credit.method != "top_entropy":
        arguments["top_entropy_quantile"] = 1.0
    return arguments


def trainer_credit(model: Any, args: GRPOConfig | None, credit: CreditConfig | None) -> tuple[GRPOConfig, CreditConfig]:
    """(args, credit) of a `CreditGRPOTrainer`: a `CreditGRPOConfig` and its credit (its defaults when `args` is
    None), or, deprecated, a plain `GRPOConfig` next to an explicit `credit`; never both sources at once."""
    if isinstance(args, CreditGRPOConfig):
        if credit is not None:
            raise ValueError("credit: the credit comes from args (CreditGRPOConfig's credit_* fields); drop credit=")
        return args, args.credit
    if credit is None and args is not None:
        raise ValueError(
            "args: CreditGRPOTrainer needs a CreditGRPOConfig (GRPOConfig's fields plus credit_*), "
            f"got {type(args).__name__}"
        )
    if args is None:
        name = model if isinstance(model, str) else get_config_model_id(model.config)
        args = CreditGRPOConfig(f"{name.split('/')[-1]}-ARCA", **(credit_arguments(credit) if credit else {}))
        return args, args.credit
    warnings.warn(
        "CreditGRPOTrainer(credit=...) is deprecated: pass args=CreditGRPOConfig(..., credit_method=...) instead",
        FutureWarning,
        stacklevel=3,
    )
    return args, credit


def check_setup(credit: CreditConfig, quantile: float, model: Any, needs_reference: bool, needs_lora: bool) -> None:
    """What `CreditGRPOTrainer` refuses before training: a `top_entropy_quantile` that disagrees with the method,
    and a reference- or LoRA-reading method without a PEFT adapter (or with TRL's frozen adapter copy as
    reference). `model`: the unwrapped model."""
    method = credit.method
    if method == "top_entropy" and quantile != credit.top_entropy_quantile:
        raise ValueError(
            f"top_entropy_quantile: must equal credit.top_entropy_quantile {credit.top_entropy_quantile} "
            f"(use CreditGRPOConfig, which sets it), got {quantile}"
        )
    if method != "top_entropy" and quantile != 1.0:
        raise ValueError(
            f"top_entropy_quantile: would mask tokens on top of method {method!r}; leave it at 1.0 "
            f"(credit_method='top_entropy' sets it), got {quantile}"
        )
    if not (needs_reference or needs_lora):
        return
    if not hasattr(model, "disable_adapter"):
        raise ValueError(f"model: method {method!r} needs the LoRA adapter; pass peft_config=LoraConfig(...)")
    if needs_reference and "ref" in model.peft_config:
        raise ValueError(
            f"model: method {method!r} needs the base model as reference, but TRL made a frozen "
            "adapter copy ('ref'); pass the unwrapped model with peft_config= instead"
        )
