"""Tiny bases and PEFT adapters saved to disk, as a user of `arca inspect` has them."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from tests.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def save_base(path: Path, **sizes) -> Path:
    tiny_model(**sizes).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_adapter(path: Path, seed: int = 1, **sizes) -> Path:
    """A LoRA (r = 4, every linear layer) with random B, so every signal is non-zero; `sizes` build it on another
    tiny model (a base it does not fit)."""
    model = get_peft_model(tiny_model(**sizes), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    model.save_pretrained(path)
    return path
