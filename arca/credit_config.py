"""The credit-assignment knobs of one training run, validated against the params.yaml keys they come from.

Errors name the params.yaml key (e.g. `credit.tau`), so a bad params file fails before any model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from arca.credit import SCHEMES

# Credit methods a run can train with: the SPEC section 2 signals plus TRL's high-entropy token mask.
METHODS: tuple[str, ...] = (
    "uniform",
    "surprisal",
    "entropy",
    "entropy_reduction",
    "kl",
    "arca",
    "top_entropy",
    "divergence",
    "entropy_drop",
    "arca_local",
)
# How the trainer gets the adapter-off states of reference-comparing signals (SPEC 2b):
# `matched` runs them on exactly the loss micro-batch (identical shapes, no dropout): exact, the default;
# `reuse` takes TRL's generation-time reference pass as it is (other batch composition): cheaper, not exact.
REFERENCE_MODES: tuple[str, ...] = ("matched", "reuse")


@dataclass(frozen=True)
class CreditConfig:
    """How per-token credit is assigned in the GRPO loss (SPEC sections 2-5).

    Args:
        method: one of `METHODS`; `uniform` is vanilla GRPO, `top_entropy` is TRL's high-entropy mask.
        scheme: normalization within a trajectory, one of `arca.credit.SCHEMES`.
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
        etr_uniform: ETR at or above which a trajectory's weights count as uniform (diagnostics).
        etr_concentrated: ETR at or below which they count as concentrated, < etr_uniform.
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
    etr_uniform: float = 0.95  # SPEC 5 default threshold
    etr_concentrated: float = 0.25  # SPEC 5 default threshold

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"study.methods: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"params.yaml: credit.scheme: unknown scheme {self.scheme!r}; choose from {', '.join(SCHEMES)}"
            )
        _check(_finite(self.tau) and self.tau > 0, "credit.tau must be > 0", self.tau)
        _check(_finite(self.mix) and 0.0 <= self.mix <= 1.0, "credit.mix must be in [0, 1]", self.mix)
        _check(
            self.w_max is None or (_number(self.w_max) and self.w_max >= 1.0),
            "credit.w_max must be null or >= 1 (the mean weight is 1)",
            self.w_max,
        )
        _check(
            isinstance(self.layer, int) and not isinstance(self.layer, bool),
            "credit.layer must be an int (index into hidden_states, -1 = final)",
            self.layer,
        )
        _check(_finite(self.eps) and self.eps >= 0, "credit.eps must be >= 0", self.eps)
        _check(_finite(self.sharpening) and self.sharpening > 0, "credit.sharpening must be > 0", self.sharpening)
        _check(
            self.reference in REFERENCE_MODES,
            f"credit.reference must be one of {', '.join(REFERENCE_MODES)}",
            self.reference,
        )
        _check(
            isinstance(self.salience_dropout, bool),
            "credit.salience_dropout must be true or false",
            self.salience_dropout,
        )
        _check(
            _finite(self.top_entropy_quantile) and 0.0 < self.top_entropy_quantile <= 1.0,
            "credit.top_entropy_quantile must be in (0, 1]",
            self.top_entropy_quantile,
        )
        _check(
            _finite(self.etr_uniform) and 0.0 < self.etr_uniform <= 1.0,
            "diagnostics.etr_uniform must be in (0, 1]",
            self.etr_uniform,
        )
        _check(
            _finite(self.etr_concentrated) and 0.0 <= self.etr_concentrated < self.etr_uniform,
            f"diagnostics.etr_concentrated must be in [0, etr_uniform = {self.etr_uniform})",
            self.etr_concentrated,
        )


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    return _number(x) and math.isfinite(x)


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ValueError(f"params.yaml: {message}, got {value!r}")
