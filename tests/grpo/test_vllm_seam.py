"""The credit weights of `CreditGRPOTrainer` depend on the completions, not on the engine that generated them.

One training step with TRL's HF `generate` path records the completions and the (B, T) weights the loss received
(`trainer.last_credit["weights"]`). A second trainer, same seed, model, adapter and params but `use_vllm=True`,
gets its completions from a fake engine put in place of TRL's `VLLMGeneration`: the object whose `generate` the
vLLM branch of `GRPOTrainer._generate_single_turn` calls. The fake returns the recorded completions as vLLM
does (prompt ids, completion ids, (B, T, 1) sampled-token logprobs after temperature, their token ids), so TRL's
own vLLM code runs downstream (`sync_weights`, top-1 logprobs, the `old_per_token_logps` pass and the
importance-sampling ratio). The weights must be equal bit for bit (float32, CPU), and other completions must
change them. Real vLLM generation is untested here (no GPU, vLLM not installed).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import trl.trainer.grpo_trainer as grpo_module
from datasets import Dataset
from peft import LoraConfig
from torch import Tensor

from arca.grpo.config import CreditGRPOConfig
from arca.grpo.trainer import CreditGRPOTrainer
from tests.tiny import tiny_model, tiny_tokenizer

EOS_ID = 3
Rollouts = list[list[int]]


def letter_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    texts = [c[0]["content"] for c in completions]
    return [sum(ch in string.ascii_lowercase for ch in t) / max(len(t), 1) for t in texts]


def make_trainer(tmp_path: Path, method: str, use_vllm: bool) -> CreditGRPOTrainer:
    """2 prompts x 4 completions, one micro-batch, one step; LoRA B set to seeded values (B = 0 gives every
    reference-comparing method zero salience, i.e. uniform weights whatever the completions)."""
    model = tiny_model()
    model.lm_head.weight.data[EOS_ID] *= 40  # completions of different lengths
    args = CreditGRPOConfig(
        output_dir=str(tmp_path), credit_method=method, use_vllm=use_vllm, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=8, max_steps=1, report_to="none", logging_steps=1,
        save_strategy="no", bf16=False, seed=0, disable_tqdm=True,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"question {i}?"}] for i in range(2)]})
    trainer = CreditGRPOTrainer(
        model=model,
        reward_funcs=letter_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    generator = torch.Generator().manual_seed(1)  # not the global RNG: both trainers start from the same state
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    return trainer


class FakeVLLM:
    """Stands in for `trl.generation.vllm_generation.VLLMGeneration`: `generate` returns `completions` with the
    4-tuple vLLM gives (`logprobs=0`: one logprob per token, the sampled one's, after temperature)."""

    completions: ClassVar[Rollouts] = []  # set by the test before the trainer is built
    calls: ClassVar[list[Rollouts]] = []  # the prompts of every `generate` call

    def __init__(self, **kwargs: Any) -> None:
        self.model, self.temperature = kwargs["model"], kwargs["temperature"]
        self.synced = 0

    def sync_weights(self) -> None:
        self.synced += 1

    @torch.no_grad()
    def generate(self, prompts: Rollouts, images: Any, num_generations: int, profiler: Any = None) -> tuple:
        FakeVLLM.calls.append(prompts)
        logprobs = []
        for prompt, completion in zip(prompts, self.completions):
            logits = self.model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            sampled = (logits / self.temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])
            logprobs.append(sampled.tolist())  # (T, 1) floats
        return prompts, list(self.completions), logprobs, [[[t] for t in c] for c in self.completions]


def hf_step(tmp_path: Path, method: str) -> tuple[Rollouts, Rollouts, Tensor]:
    """One HF-generate step: the prompt and completion ids of `_generate_single_turn`, the loss's weights (B, T)."""
    trainer = make_trainer(tmp_path, method, use_vllm=False)
    seen: list[tuple[Rollouts, Rollouts]] = []
    generate = trainer._generate_single_turn

    def spy(prompt_ids: Rollouts, *args: Any, **kwargs: Any) -> tuple[Rollouts, None]:
        completion_ids, logprobs = generate(prompt_ids, *args, **kwargs)
        seen.append((prompt_ids, completion_ids))
        return completion_ids, logprobs

    trainer._generate_single_turn = spy
    trainer.train()
    assert len(seen) == 1 and trainer.last_credit is not None
    return *seen[0], trainer.last_credit["weights"]


def vllm_step(tmp_path: Path, method: str, completions: Rollouts) -> Tensor:
    """One step of a `use_vllm=True` trainer whose engine (`FakeVLLM`) delivers `completions`: the weights."""
    FakeVLLM.completions, FakeVLLM.calls = completions, []
    trainer = make_trainer(tmp_path, method, use_vllm=True)
    assert isinstance(trainer.vllm_generation, FakeVLLM)
    trainer.train()
    assert len(FakeVLLM.calls) == 1 and trainer.vllm_generation.synced == 1  # TRL's vLLM branch ran
    assert any("sampling/sampling_logp_difference/mean" in log for log in trainer.state.log_history)  # IS ran
    assert trainer.last_credit is not None
    return trainer.last_credit["weights"]


@pytest.mark.parametrize("method", ["arca", "arca_local", "kl"])
def test_credit_weights_do_not_depend_on_the_generation_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    monkeypatch.setattr(grpo_module, "VLLMGeneration", FakeVLLM)
    # TRL shuffles the generation batch with the global RNG, which HF sampling advances and vLLM does not; keep
    # the generation order so that both runs' micro-batch holds the same rows in the same order.
    monkeypatch.setattr(grpo_module, "shuffle_sequence_dict", lambda batch: batch)
    prompts, completions, expected = hf_step(tmp_path / "hf", method)
    assert len({len(c) for c in completions}) > 1  # real padding in the micro-batch
    mask = torch.zeros_like(expected, dtype=torch.bool)
    for row, completion in enumerate(completions):
        mask[row, : len(completion)] = True
    assert not torch.all(expected[mask] == 1.0)  # a non-trivial credit, else equality proves nothing

    got = vllm_step(tmp_path / "vllm", method, completions)
    assert FakeVLLM.calls == [prompts]  # same prompts in the same order: the recorded rows line up
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(got, expected), f"{method}: weights differ between HF and vLLM-delivered rollouts"

    # Power: other completions (every non-EOS token moved to another printable id) give other weights.
    other = [[t if t == EOS_ID else 4 + (t + 7) % 100 for t in c] for c in completions]
    changed = vllm_step(tmp_path / "other", method, other)
    assert changed.shape == expected.shape and not torch.equal(changed[mask], expected[mask])
