"""Loading a trained run back: the base model with one of the run's adapter snapshots applied."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from arca.models.base import resolve_dtype

BASE_DIR = Path("data/models/base")


def snapshots(run_dir: Path) -> dict[int, Path]:
    """step -> adapter snapshot directory (`adapters/step-000000` is the untrained LoRA, B = 0)."""
    found = {
        int(m.group(1)): p for p in (run_dir / "adapters").glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))
    }
    if not found:
        raise FileNotFoundError(f"{run_dir}/adapters has no step-* snapshots; rerun the train stage for this run")
    return dict(sorted(found.items()))


def load_base_model(dtype: str = "auto", base_dir: Path = BASE_DIR):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=resolve_dtype(dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


def with_adapter(base, adapter_dir: Path) -> PeftModel:
    """Wrap `base` with the adapter at `adapter_dir`; call `.unload()` on the result to get `base` back."""
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).eval()


def params_hash(*sections: dict) -> str:
    """md5 of the JSON of the params sections a file was computed from (recorded in Parquet metadata)."""
    return hashlib.md5(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()


def vllm_sampler(dtype: str, max_rank: int, seed: int):
    """A `VLLMSampler` over the base model, in the dtype the HF path would load (`auto`: bf16 on CUDA)."""
    from arca.sampling.vllm import VLLMSampler

    name = str(resolve_dtype(dtype)).removeprefix("torch.")
    return VLLMSampler(BASE_DIR, dtype=name, max_rank=max_rank, seed=seed)
