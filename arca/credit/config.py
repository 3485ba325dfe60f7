"""The credit-assignment knobs of one training run (SPEC sections 2-4), validated on construction.

`CreditConfig` is the value object the trainer, the dumps and the noise tables read. Errors name the field
(`tau: must be > 0, got 0`) and carry it (`CreditConfigError.field`), so a caller that exposes the fields
under other names (`CreditGRPOConfig`'s `credit_tau`, the pipeline's `credit.tau`) can rename them. The
diagnostics thresholds (SPEC 5 regimes) are not credit knobs: they belong to the analysis that reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from arca.methods import (
    FALLBACKS,
    METHOD_FIELDS,
    METHODS,
    NORMALIZATION,
    PERMUTED_SUFFIX,
    REFERENCE_MODES,
    SCHEMES,
    run_method,
    split_run_method,
)

# Credit methods, the fields each one's training reads and the permuted-run labels: arca.methods, the one table.
__all__ = ["METHODS", "METHOD_FIELDS", "NORMALIZATION", "PERMUTED_SUFFIX", "REFERENCE_MODES", "CreditConfig"]
__all__ += ["CreditConfigError", "run_method", "split_run_method"]


class CreditConfigError(ValueError):
    """A credit field is invalid. The message is `<field>: <reason>, got <value>`.

    Attributes:
        field: the `CreditConfig` field name (e.g. `tau`).
        reason: what is wrong and the fix, without the field name.
        value: the rejected value.
    """

    def __init__(self, field: str, reason: str, value: object):
        self.field, self.reason, self.value = field, reason, value
        super().__init__(f"{field}: {reason}, got {value!r}")

    def renamed(self, name: str) -> ValueError:
        """The same error under the name a caller exposes the field as (e.g. `credit_tau`)."""
        return ValueError(f"{name}: {self.reason}, got {self.value!r}")


@dataclass(frozen=True)
class CreditConfig:
    """How per-token credit is assigned in the GRPO loss (SPEC sections 2-4).

    Args:
        method: one of `METHODS`; `uniform` is vanilla GRPO, `top_entropy` keeps the tokens whose entropy is in
            the top `top_entropy_quantile` of the micro-batch (TRL's `get_high_entropy_mask`), at mean weight 1.
        scheme: normalization within a trajectory, one of `arca.credit.normalize.SCHEMES`.
        tau: softmax temperature (scheme `softmax` only), > 0.
        mix: lambda of `w <- (1 - lambda) + lambda * w`, in [0, 1].
        w_max: optional cap on a weight (then renormalized), None or >= 1.
        layer: index into HF `hidden_states` for ARCA's residual (-1 = final, post-norm).
        eps: a trajectory whose salience mass is <= eps * T falls back to uniform weights.
        top_entropy_quantile: share of tokens (highest entropy) kept by `top_entropy`, in (0, 1].
        sharpening: exponent p of `a <- (a + eps)^p` before normalization (SPEC 3), > 0; 1 = off.
        reference: one of `REFERENCE_MODES`, how adapter-off states are obtained in training.
        salience_dropout: keep LoRA dropout active in the adapter-on pass that feeds the salience (the
            paper's code does; SPEC 2b forbids it otherwise). Only for reproducing the paper.
        fallback: the degenerate-row rule, one of `arca.credit.normalize.FALLBACKS`: `raw_mean` (SPEC 3, `sum(a) <=
            eps * T` on the raw saliences) or `sharpened_sum` (the paper's code, `sum (a + eps)^p <= eps`).
        permute: the permutation control (SPEC 3): after normalization, each completion's weights are permuted
            uniformly at random over its valid tokens (`arca.credit.normalize.permute_weights`). A per-run option (the
            run's cell in `study.runs`), not a shared credit key; meaningless for `uniform`, so refused there.
    """

    method: str
    scheme: str = "mean"  # SPEC 3 default: a / mean(a) keeps the signal's own shape
    tau: float = 1.0  # softmax on raw saliences, no sharpening or flattening
    mix: float = 1.0  # pure method weights; lower it to shrink toward vanilla GRPO
    w_max: float | None = None  # no cap: the schemes already keep the mean weight at 1
    layer: int = -1  # the final hidden state, the one the LM head reads
    eps: float = 1e-8  # only an exactly zero residual (LoRA B = 0 at step 0) falls back
    top_entropy_quantile: float = 0.2  # the 20% "forking tokens" of Wang et al. (2025)
    sharpening: float = 1.0  # off: the signal's own shape (the paper's code squares it: 2)
    reference: str = "matched"  # exact in any dtype (SPEC 2b)
    salience_dropout: bool = False  # dropout noise in a salience is not signal (SPEC 2b)
    fallback: str = "raw_mean"  # SPEC 3: an exactly zero signal falls back whatever the sharpening
    permute: bool = False  # the signal's own positions; True is the control that loses them

    def __post_init__(self) -> None:
        _check("method", self.method in METHODS, f"must be one of {', '.join(METHODS)}", self.method)
        _check("scheme", self.scheme in SCHEMES, f"must be one of {', '.join(SCHEMES)}", self.scheme)
        _check("tau", _finite(self.tau) and self.tau > 0, "must be > 0", self.tau)
        _check("mix", _finite(self.mix) and 0.0 <= self.mix <= 1.0, "must be in [0, 1]", self.mix)
        _check(
            "w_max",
            self.w_max is None or (_number(self.w_max) and self.w_max >= 1.0),
            "must be None or >= 1 (the mean weight is 1)",
            self.w_max,
        )
        _check(
            "layer",
            isinstance(self.layer, int) and not isinstance(self.layer, bool),
            "must be an int (index into hidden_states, -1 = final)",
            self.layer,
        )
        _check("eps", _finite(self.eps) and self.eps >= 0, "must be >= 0", self.eps)
        _check("sharpening", _finite(self.sharpening) and self.sharpening > 0, "must be > 0", self.sharpening)
        _check(
            "top_entropy_quantile",
            _finite(self.top_entropy_quantile) and 0.0 < self.top_entropy_quantile <= 1.0,
            "must be in (0, 1]",
            self.top_entropy_quantile,
        )
        modes = ", ".join(REFERENCE_MODES)
        _check("reference", self.reference in REFERENCE_MODES, f"must be one of {modes}", self.reference)
        dropout = self.salience_dropout
        _check("salience_dropout", isinstance(dropout, bool), "must be True or False", dropout)
        _check("fallback", self.fallback in FALLBACKS, f"must be one of {', '.join(FALLBACKS)}", self.fallback)
        _check("permute", isinstance(self.permute, bool), "must be True or False", self.permute)
        _check(
            "permute",
            not (self.permute and self.method == "uniform"),
            "uniform weights are all 1, permuting them changes nothing; use it with a salience method",
            self.permute,
        )

    def normalization(self) -> dict[str, object]:
        """The keyword arguments of `arca.credit.normalize.normalize` after `(saliences, mask)`: one call shape for the
        trainer, the dumps and the diagnostics, so none of them can drop a knob."""
        return {
            "scheme": self.scheme,
            "tau": self.tau,
            "eps": self.eps,
            "mix": self.mix,
            "w_max": self.w_max,
            "sharpening": self.sharpening,
            "fallback": self.fallback,
        }


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    return _number(x) and math.isfinite(x)


def _check(field: str, ok: bool, reason: str, value: object) -> None:
    if not ok:
        raise CreditConfigError(field, reason, value)
