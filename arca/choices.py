"""The choice lists params and library share beside the method table (`arca.methods`): training, model and
sampling options. Torch-free, so the params schema reads them without loading torch; the library checks its
arguments against the same tuples.

Imports: the standard library only (the base layer of `arca`).
"""

from __future__ import annotations

LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16's
# HF schedulers that need no extra kwargs (`cosine_with_min_lr`, `warmup_stable_decay`, ... do, and are left out).
LR_SCHEDULERS: tuple[str, ...] = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
DEVICES: tuple[str, ...] = ("auto", "cuda", "cpu")  # `auto`: CUDA when torch sees a device, else the CPU
MODEL_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")  # `model.dtype`, besides `auto`
DTYPES: tuple[str, ...] = ("auto", *MODEL_DTYPES)
GRADERS: tuple[str, ...] = ("math_verify", "exact")  # `train.grader`: math-verify equivalence, the paper's match
ENGINES: tuple[str, ...] = ("hf", "vllm")  # sampling engines of the dump and evaluate stages
