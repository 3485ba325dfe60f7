"""`use_vllm` training syncs `W + s B A` copies to vLLM and leaves the frozen bf16 base bit-identical (issue 22,
fix 4); the merged copy used by evaluation's HF decoding (fix 5) decodes as the unmerged adapter.

vLLM is faked as in tests/grpo/test_vllm_seam.py, one level lower: `FakeSync` is TRL's own `VLLMGeneration` without
its engine, so `sync_weights` runs TRL's `_iter_named_params` (or the trainer's replacement of it) and records
every tensor it would load into vLLM.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import trl.trainer.grpo_trainer as grpo_module
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl.generation.vllm_generation import VLLMGeneration

from arca.grpo.config import CreditGRPOConfig
from arca.grpo.trainer import CreditGRPOTrainer
from arca.sampling.merged import merged_copy, merged_named_weights
from arca.sampling.rollouts import generate
from tests.tiny import tiny_model, tiny_tokenizer


class FakeDist:
    is_fsdp = False

    @staticmethod
    def gather_params(params: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class FakeSync(VLLMGeneration):
    """TRL's `VLLMGeneration` without vLLM: `sync_weights` records what it would load (name -> tensor copy)."""

    def __init__(self, **kwargs: Any) -> None:  # no engine, no server
        self.model, self._dist, self.received = kwargs["model"], FakeDist(), {}

    def sync_weights(self) -> None:
        self.received = {name: tensor.clone() for name, tensor in self._iter_named_params()}


def bf16_trainer(tmp_path, monkeypatch) -> CreditGRPOTrainer:
    monkeypatch.setattr(grpo_module, "VLLMGeneration", FakeSync)
    args = CreditGRPOConfig(
        output_dir=str(tmp_path), credit_method="arca", use_vllm=True, per_device_train_batch_size=4,
        num_generations=4, max_completion_length=4, max_steps=1, report_to="none", save_strategy="no",
        bf16=False, use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "question?"}]]})
    return CreditGRPOTrainer(
        model=tiny_model().to(torch.bfloat16),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )


def expected_merged(model) -> dict[str, torch.Tensor]:
    """The merge by hand, on a float32 copy of every weight: `W + s B A` rounded once to W's dtype."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            w = module.base_layer.weight
            delta = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
            vllm_name = name.removeprefix("base_model.model.") + ".weight"
            out[vllm_name] = (w.float() + delta * module.scaling["default"]).to(w.dtype)
    return out


def test_vllm_sync_sends_merged_copies_and_keeps_the_base(tmp_path, monkeypatch):
    trainer = bf16_trainer(tmp_path, monkeypatch)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert all(p.dtype == torch.bfloat16 for p in base.values())
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):  # N syncs, the adapter moving between them as training moves it
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05
        trainer.vllm_generation.sync_weights()
        for name, param in model.named_parameters():
            if "lora_" not in name:
                assert torch.equal(param, base[name]), f"{name}: the frozen base changed"
        received = trainer.vllm_generation.received
        assert not any("lora_" in name or "base_layer" in name for name in received)
        merged = expected_merged(model)
        assert merged and set(merged) <= set(received)
        for name, tensor in merged.items():
            assert received[name].dtype == torch.bfloat16 and torch.equal(received[name], tensor), name
        assert any(not torch.equal(received[n], base[f"base_model.model.{n[:-7]}.base_layer.weight"]) for n in merged)
    unmerged = {n for n in received if n not in merged}  # embeddings, norms: as they are
    assert unmerged and all(torch.equal(received[n], base[f"base_model.model.{n}"]) for n in unmerged)


def test_merged_copy_decodes_as_the_unmerged_adapter():
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = merged_copy(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    for n, p in model.named_parameters():  # the PEFT model is untouched, adapter and base alike
        assert torch.equal(p, before[n]), n
    tokenizer = tiny_tokenizer()
    prompts = [[{"role": "user", "content": f"question {i}?"}] for i in range(4)]
    kwargs = {"samples": 1, "greedy": True, "max_new_tokens": 12, "batch_size": 4}
    got, expected = generate(merged, tokenizer, prompts, **kwargs), generate(model, tokenizer, prompts, **kwargs)
    assert got.texts == expected.texts and len(set(expected.texts)) > 1
    base = generate(copy.deepcopy(model).unload(), tokenizer, prompts, **kwargs)
    assert base.texts != expected.texts  # the adapter changes the decodes: the comparison can fail
    names = dict(merged_named_weights(model))
    for n, p in merged.named_parameters():
        torch.testing.assert_close(p, names[n], rtol=0, atol=0)
