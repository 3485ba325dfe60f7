"""SPEC 2b in the trainer, on the tiny Qwen3 on CPU: reference-comparing saliences are exactly 0 at LoRA B = 0 in
bfloat16 (matched adapter-off pass), `arca_local` is the per-module sum of the adapter's own outputs, LoRA
dropout never reaches the weights unless `credit.salience_dropout`, and bf16 runs log a running noise estimate."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from trl import GRPOTrainer

from arca.credit.signals import compute_signals
from arca.grpo.noise_probe import NOISE_SIGNALS
from arca.grpo.trainer import CreditGRPOTrainer
from arca.run.files import LOG_COLUMNS
from tests.grpo.test_trainer import (
    _count_backbone_calls,
    config,
    letter_reward,
    lora,
    make_trainer,
    model_with_eos,
    one_batch,
    prompts,
)
from tests.tiny import tiny_tokenizer

REFERENCE_SIGNALS = ("arca", "kl", "entropy_reduction", "divergence")


def bf16_model() -> torch.nn.Module:
    return model_with_eos().to(torch.bfloat16)


def fill_lora_b(trainer, std: float = 0.5) -> None:
    """A 'trained' adapter: B filled with seeded Gaussian values, so adapter on != adapter off."""
    generator = torch.Generator().manual_seed(1)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * std)


def record_credit(trainer) -> list[dict]:
    """Wrap `_apply_credit` to keep, per micro-batch, the ids it scored and the `last_credit` it produced."""
    records, apply = [], trainer._apply_credit

    def spy(inputs, states):
        apply(inputs, states)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)  # (B, P + T)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        records.append({"ids": ids, "attention_mask": attn, **trainer.last_credit})

    trainer._apply_credit = spy
    return records


def count_calls(trainer, method_name: str) -> list[int]:
    """Wrap a trainer method to count its calls (the returned one-element list holds the count)."""
    calls, inner = [0], getattr(trainer, method_name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    setattr(trainer, method_name, counted)
    return calls


def dropout_lora(p: float = 0.5) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=p)


# ---- exact zeros at B = 0 in bfloat16 ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.04, 0.0])
@pytest.mark.parametrize("method", [*REFERENCE_SIGNALS, "arca_local"])
def test_fresh_lora_is_exactly_zero_in_bf16_and_every_row_falls_back(tmp_path, method, beta):
    # learning_rate 0 keeps B = 0 through both steps, so the second iteration over each micro-batch
    # (num_iterations = 2, gradient accumulation 2) is checked with the cached matched reference too.
    trainer = make_trainer(
        tmp_path, method, model=bf16_model(), beta=beta, learning_rate=0.0, num_iterations=2, max_steps=2
    )
    assert trainer.model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    records = record_credit(trainer)
    passes = count_calls(trainer, "_salience_pass")
    trainer.train()
    assert len(records) == 4  # 2 steps x 2 micro-batches
    for r in records:
        mask = r["mask"].bool()
        assert mask.any(1).all()
        assert torch.all(r["saliences"] == 0), f"{method}: non-zero salience with B = 0"
        assert r["fallback"].all() and torch.all(r["weights"][mask] == 1)
    # The adapter-off pass runs once per micro-batch and is reused by the second iteration.
    assert passes[0] == (2 if method in REFERENCE_SIGNALS else 0)
    if beta:  # TRL's KL penalty reads the matched reference log-probs: exactly 0 as well
        assert [h["kl"] for h in trainer.state.log_history if "kl" in h] == [0.0, 0.0]


@pytest.mark.parametrize("beta", [0.04, 0.0])  # 0: the adapter-off pass is the backbone alone
def test_fresh_lora_is_exactly_zero_in_bf16_with_gradient_checkpointing(tmp_path, beta):
    """The loss forward runs under checkpointing, the matched adapter-off pass without: same roundings."""
    trainer = make_trainer(
        tmp_path, "arca", model=bf16_model(), beta=beta, learning_rate=0.0, max_steps=1, gradient_checkpointing=True
    )
    records = record_credit(trainer)
    trainer.train()
    assert len(records) == 2
    assert all(torch.all(r["saliences"] == 0) and r["fallback"].all() for r in records)


def test_matched_reference_costs_no_pass_beyond_trl_with_num_iterations(tmp_path):
    """beta > 0, num_iterations = 2: TRL's generation-time reference pass is replaced, not added to."""
    overrides = {"max_steps": 2, "num_iterations": 2, "beta": 0.04}
    plain = GRPOTrainer(
        model=model_with_eos(),
        reward_funcs=letter_reward,
        args=config(tmp_path / "plain", **overrides),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer(),
        peft_config=lora(),
    )
    plain_calls = _count_backbone_calls(plain)
    plain.train()
    ours = make_trainer(tmp_path / "ours", "arca", **overrides)
    our_calls = _count_backbone_calls(ours)
    ours.train()
    assert our_calls[0] == plain_calls[0]


def test_reuse_equals_matched_in_bf16_on_cpu(tmp_path):
    """Documents what `reuse` gives here: TRL's generation-time chunks have the loss micro-batch's shapes
    (`per_device_train_batch_size` rows x the generation batch's padded length) and CPU kernels compute each
    row alone, so on CPU `reuse` is bit-identical to `matched` in bf16, at B = 0 and with a trained adapter.
    Only `matched` guarantees it: on other kernels (GPU) the rows sharing a chunk may change the roundings."""
    saliences = {}
    for mode in ("matched", "reuse"):
        trainer = make_trainer(
            tmp_path / mode,
            "arca",
            model=bf16_model(),
            credit_kwargs={"reference": mode},
            beta=0.04,
            learning_rate=0.0,
            max_steps=1,
        )
        fill_lora_b(trainer, std=0.05)
        records = record_credit(trainer)
        trainer.train()
        saliences[mode] = torch.cat([r["saliences"] for r in records])
    assert saliences["matched"].gt(0).any()
    assert torch.equal(saliences["reuse"], saliences["matched"])


# ---- arca_local -------------------------------------------------------------------------------------------------


def manual_lora_norms(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) float64 sum over LoRA layers of ||s * B A x||, from each layer's input in an eval-mode pass."""
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A"):
            handles.append(module.register_forward_hook(lambda m, a, out, n=name: inputs.__setitem__(n, a[0])))
    training = model.training
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    model.train(training)
    for handle in handles:
        handle.remove()
    modules, total = dict(model.named_modules()), torch.zeros(input_ids.shape, dtype=torch.float64)
    for name, x in inputs.items():
        m = modules[name]
        a, b = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
        total += (x.double() @ a.T @ b.T * m.scaling["default"]).norm(dim=-1)
    return total


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_arca_local_is_the_manual_per_module_sum(tmp_path, gradient_checkpointing):
    trainer = make_trainer(
        tmp_path, "arca_local", learning_rate=0.0, max_steps=1, gradient_checkpointing=gradient_checkpointing
    )
    fill_lora_b(trainer)
    records = record_credit(trainer)
    calls = _count_backbone_calls(trainer)
    trainer.train()
    assert calls[0] == 2  # the two loss forwards: no reference pass, no extra pass
    for r in records:
        num_tokens = r["mask"].size(1)
        want = manual_lora_norms(trainer.model, r["ids"], r["attention_mask"])[:, -num_tokens - 1 : -1]
        mask = r["mask"].bool()
        assert r["saliences"][mask].gt(0).all()
        torch.testing.assert_close(r["saliences"][mask].double(), want[mask], rtol=1e-6, atol=0)


# ---- LoRA dropout -----------------------------------------------------------------------------------------------


def dropout_trainer(tmp_path, method: str, salience_dropout: bool) -> CreditGRPOTrainer:
    trainer = CreditGRPOTrainer(
        model=model_with_eos(),
        reward_funcs=letter_reward,
        args=config(tmp_path, method, {"salience_dropout": salience_dropout}, max_steps=1, beta=0.0),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer(),
        peft_config=dropout_lora(),
    )
    fill_lora_b(trainer)
    return trainer


@pytest.mark.parametrize("method", ["arca", "kl", "arca_local"])
def test_lora_dropout_does_not_change_the_weights_of_a_batch(tmp_path, method):
    trainer = dropout_trainer(tmp_path, method, salience_dropout=False)
    batch = one_batch(trainer)
    calls = _count_backbone_calls(trainer)
    weights = []
    for _ in range(2):
        trainer._compute_loss(trainer.model, batch)
        weights.append(trainer.last_credit["weights"].clone())
    assert torch.equal(weights[0], weights[1])
    # Per call (beta = 0): the loss forward, the dropout-free adapter-on pass and, for a reference signal, the
    # matched adapter-off pass. arca_local reads each LoRA layer's input before its dropout, but the dropout of
    # the layers below is in that input, so it needs the dropout-free pass too.
    assert calls[0] == 2 * (2 if method == "arca_local" else 3)
    # The weights are those of a dropout-free offline pass (SPEC 2b), not of the training forward's draw.
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    scored = torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], 1)
    mask = trainer.last_credit["mask"].bool()  # (B, T)
    offline = compute_signals(trainer.model, ids, attn, scored, names=[method])[method][:, -mask.size(1) :]
    torch.testing.assert_close(trainer.last_credit["saliences"][mask], offline[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["arca", "kl", "arca_local"])
def test_salience_dropout_keeps_the_papers_noisy_weights(tmp_path, method):
    trainer = dropout_trainer(tmp_path, method, salience_dropout=True)
    batch = one_batch(trainer)
    weights = []
    for _ in range(2):
        trainer._compute_loss(trainer.model, batch)
        weights.append(trainer.last_credit["weights"].clone())
    assert not torch.equal(weights[0], weights[1])


# ---- running noise estimate --------------------------------------------------------------------------------------


def test_bf16_run_logs_noise_per_precision_sensitive_signal(tmp_path):
    trainer = make_trainer(tmp_path, "arca", model=bf16_model(), max_steps=2)
    trainer.train()
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 2
    for signal in ("arca", "arca_local", "kl"):
        assert signal in NOISE_SIGNALS
        assert f"noise_{signal}" in LOG_COLUMNS and f"noise_rank_{signal}" in LOG_COLUMNS
    last = rows[-1]  # after an update (B != 0): a finite noise share and a rank correlation
    for signal in NOISE_SIGNALS:
        assert math.isfinite(last[f"credit/noise_{signal}"]) and last[f"credit/noise_{signal}"] >= 0
        assert abs(last[f"credit/noise_rank_{signal}"]) <= 1 + 1e-9
    # The probe leaves the run as it found it: bf16 base weights, float32 adapter, train mode.
    model = trainer.model
    assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_float32_run_logs_no_noise(tmp_path):
    trainer = make_trainer(tmp_path, "arca", max_steps=1)
    trainer.train()
    assert not any(k.startswith("credit/noise") for h in trainer.state.log_history for k in h)
