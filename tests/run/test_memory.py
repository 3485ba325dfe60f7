"""arca/run/memory.py: the planner's peak-memory estimate. Parameter counts against real models (a tiny one
built, Qwen3-1.7B on the meta device), the terms' directions, and that the module stays torch-free."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen3Config

from arca.models.tiny import tiny_model
from arca.run.memory import (
    ALL_LINEAR,
    Architecture,
    Shape,
    activation_bytes,
    lora_param_count,
    method_extra_bytes,
    param_count,
    peak_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
QWEN3 = json.loads((ROOT / "bench" / "qwen3_1_7b_base_config.json").read_text())
SHAPE = Shape(
    micro_batch=8,
    rollouts=32,
    prompt_tokens=512,
    completion_tokens=512,
    dtype="bfloat16",
    rank=64,
    targets=ALL_LINEAR,
    lora_dropout=0.05,
    gradient_checkpointing=False,
)


def test_qwen3_1_7b_weights_are_its_parameters_in_bf16():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3))
    params = sum(p.numel() for p in model.parameters())  # tied head counted once
    arch = Architecture.from_config(QWEN3)
    assert param_count(arch) == params == 1_720_574_976
    assert peak_bytes(arch, SHAPE)["weights"] == 2 * params
    assert lora_param_count(arch, 64, ALL_LINEAR) == 69_730_304  # docs/profiles.md: 69.7M trainable at r = 64


def test_counts_match_a_built_model_and_peft():
    model = tiny_model(512)
    config = model.config.to_dict()
    arch = Architecture.from_config(config)
    assert param_count(arch) == sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert lora_param_count(arch, 4, ("q_proj", "down_proj")) == trainable
    assert lora_param_count(arch, 4, "all-linear") == lora_param_count(arch, 4, ALL_LINEAR)


def test_the_estimate_grows_with_batch_rank_length_and_shrinks_with_checkpointing():
    arch = Architecture.from_config(QWEN3)
    base = peak_bytes(arch, SHAPE)["peak"]
    assert peak_bytes(arch, dataclasses.replace(SHAPE, micro_batch=16))["peak"] > base
    assert peak_bytes(arch, dataclasses.replace(SHAPE, rank=128))["peak"] > base
    assert peak_bytes(arch, dataclasses.replace(SHAPE, completion_tokens=1024))["peak"] > base
    assert peak_bytes(arch, dataclasses.replace(SHAPE, gradient_checkpointing=True))["peak"] < base
    assert activation_bytes(arch, dataclasses.replace(SHAPE, lora_dropout=0.0)) < activation_bytes(arch, SHAPE)
    fp32 = dataclasses.replace(SHAPE, dtype="float32")
    assert peak_bytes(arch, fp32)["weights"] == 2 * peak_bytes(arch, SHAPE)["weights"]
    terms = peak_bytes(arch, SHAPE, "kl")
    training = terms["activations"] + terms["head_chunk"] + terms["method"]
    assert terms["peak"] == terms["weights"] + terms["lora_state"] + max(terms["generation"], training)


def test_method_extras():
    arch = Architecture.from_config(QWEN3)
    extra = {m: method_extra_bytes(arch, SHAPE, m) for m in ("uniform", "surprisal", "arca", "kl", "entropy_reduction")}
    assert extra["uniform"] == extra["surprisal"] == 0  # surprisal reads TRL's log-probs
    assert extra["arca"] == 2 * SHAPE.micro_batch * 1024 * arch.hidden * 4  # one float32 (B, T, H) per side
    assert extra["kl"] == 2 * extra["entropy_reduction"] == 2 * 3 * 1024 * arch.vocab * 4  # kl sweeps both sides


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="intermediate_size"):
        Architecture.from_config({"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 8})
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        lora_param_count(Architecture.from_config(QWEN3), 8, ("c_attn",))


def test_module_is_torch_free():
    tree = ast.parse((ROOT / "arca" / "run" / "memory.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {name.split(".")[0] for name in imported} <= {"__future__", "dataclasses", "typing"}
