"""CreditGRPOTrainer on a tiny random Qwen3 (CPU, a couple of steps): what trains, what the loss receives,
how many forward passes each method costs, and that `uniform` is TRL's GRPO bit for bit."""

from __future__ import annotations

import string

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from arca.credit.config import METHODS, CreditConfig
from arca.credit.normalize import normalize
from arca.credit.signals import compute_signals
from arca.grpo.capture import backbone, layer_module
from arca.grpo.config import CreditGRPOConfig
from arca.grpo.trainer import REF_KEY, CreditGRPOTrainer
from tests.tiny import tiny_model, tiny_tokenizer

EOS_ID = 3


def letter_reward(completions, **kwargs) -> list[float]:
    """Toy reward with a spread inside every group: the share of lowercase letters in the completion."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in string.ascii_lowercase for ch in t) / max(len(t), 1) for t in texts]


def prompts(n: int = 4) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"question {i}?"}] for i in range(n)],
            "answer": ["1"] * n,
        }
    )


def model_with_eos() -> torch.nn.Module:
    """Tiny model whose EOS logit swings widely, so completions end at different lengths (real padding)."""
    model = tiny_model()
    model.lm_head.weight.data[EOS_ID] *= 40
    return model


def config(tmp_path, method: str | None = None, credit_kwargs=None, **overrides) -> GRPOConfig:
    """2 prompts x 4 generations per step, in 2 micro-batches of 4: TRL's `GRPOConfig` when `method` is None,
    else a `CreditGRPOConfig` with `credit_method=method` and `credit_<k>=v` for each of `credit_kwargs`."""
    kwargs = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": False,
        "seed": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    if method is None:
        return GRPOConfig(**kwargs)
    credit = {f"credit_{k}": v for k, v in (credit_kwargs or {}).items()}
    return CreditGRPOConfig(credit_method=method, **credit, **kwargs)


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def make_trainer(tmp_path, method: str, model=None, credit_kwargs=None, **overrides) -> CreditGRPOTrainer:
    return CreditGRPOTrainer(
        model=model if model is not None else model_with_eos(),
        reward_funcs=letter_reward,
        args=config(tmp_path, method, credit_kwargs, **overrides),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer(),
        peft_config=lora(),
    )


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


CASES = [(m, {}) for m in METHODS] + [("arca", {"layer": 1})]


@pytest.mark.parametrize(("method", "credit_kwargs"), CASES, ids=[m + "-layer1" * bool(k) for m, k in CASES])
def test_every_method_trains_the_adapter_only(tmp_path, method, credit_kwargs):
    trainer = make_trainer(tmp_path, method, credit_kwargs=credit_kwargs)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for n, p in trainer.model.named_parameters():
        if "lora_B" in n:
            assert not torch.equal(p, before[n]), f"Parameter {n} has not changed."
        elif "lora_" not in n:  # We expect the base model params to be the same
            torch.testing.assert_close(p, before[n], rtol=0, atol=0, msg=f"Parameter {n} has changed.")
    logged = trainer.state.log_history[-2]
    for name in ("gini", "etr", "frac_uniform", "frac_middle", "frac_concentrated", "fallback_rate", "max_weight"):
        assert f"credit/{name}" in logged


def test_uniform_is_plain_grpo_bit_for_bit(tmp_path):
    plain = GRPOTrainer(
        model=model_with_eos(),
        reward_funcs=letter_reward,
        args=config(tmp_path / "plain"),
        train_dataset=prompts(),
        processing_class=tiny_tokenizer(),
        peft_config=lora(),
    )
    plain.train()
    ours = make_trainer(tmp_path / "ours", "uniform")
    ours.train()
    expected, got = lora_weights(plain), lora_weights(ours)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=f"{name} differs from TRL")
    assert any(not torch.equal(w, torch.zeros_like(w)) for n, w in got.items() if "lora_B" in n)


def _record_credit(trainer, check_signals: bool = False) -> list[dict]:
    """Wrap `_apply_credit` to keep what the loss receives (and, optionally, offline signals to compare)."""
    records, apply = [], trainer._apply_credit

    def spy(inputs, states):
        sequence_advantages = inputs["advantages"].clone()
        apply(inputs, states)
        record = {
            "step": trainer.state.global_step,
            "A": sequence_advantages,
            "A_t": inputs["advantages"].clone(),
            **trainer.last_credit,
        }
        if check_signals:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            cm = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], 1)
            offline = compute_signals(
                trainer.model, ids, am, cm, layer=trainer.credit.layer, names=[trainer.credit.method]
            )[trainer.credit.method]
            record["offline"] = offline[:, -inputs["completion_ids"].size(1) :]
        records.append(record)

    trainer._apply_credit = spy
    return records


@pytest.mark.parametrize(
    ("method", "beta", "reference"),
    [("arca", 0.04, "matched"), ("kl", 0.0, "matched"), ("arca_local", 0.04, "matched"), ("arca", 0.0, "reuse")],
)
def test_loss_gets_mean_one_weights_and_arca_starts_uniform(tmp_path, method, beta, reference):
    trainer = make_trainer(tmp_path, method, credit_kwargs={"reference": reference}, beta=beta)
    records = _record_credit(trainer, check_signals=True)
    trainer.train()
    assert [r["step"] for r in records] == [0, 0, 1, 1]  # 2 steps x 2 micro-batches
    lengths = torch.cat([r["mask"].sum(1) for r in records])
    assert lengths.min() < lengths.max(), "completions should differ in length (padding exercised)"
    for r in records:
        mask, w = r["mask"].bool(), r["weights"]
        torch.testing.assert_close((w * mask).sum(1), mask.sum(1).float(), rtol=1e-5, atol=1e-5)
        assert torch.all(w[~mask] == 0)
        torch.testing.assert_close(r["A_t"], r["A"][:, None] * w, rtol=0, atol=0)
        # The states hooked out of TRL's passes give the same signal as two fresh offline passes.
        torch.testing.assert_close(r["saliences"], r["offline"] * mask, rtol=1e-4, atol=1e-5)
        if r["step"] == 0:  # LoRA B = 0: the adapter changes nothing, every row falls back to uniform
            assert r["fallback"].all()
            assert torch.all(w[mask] == 1)
        else:
            assert not r["fallback"].any()
            assert w[mask].std() > 0


def test_apply_credit_on_a_padded_batch(tmp_path):
    trainer = make_trainer(tmp_path, "arca")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    policy = torch.randn(2, 4, 32)
    ref = policy.clone()
    ref[0, :3] += torch.tensor([1.0, 2.0, 3.0])[:, None] / 32**0.5  # residual norms 1, 2, 3 in row 0
    inputs = {
        "completion_ids": torch.ones(2, 4, dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor([2.0, -1.0]),
        REF_KEY.format("arca"): ref,
    }
    trainer._apply_credit(inputs, {"arca": policy})
    expected_w = torch.tensor([[0.5, 1.0, 1.5, 0.0], [1.0, 1.0, 0.0, 0.0]])  # mean scheme; row 1 falls back
    torch.testing.assert_close(trainer.last_credit["weights"], expected_w)
    assert trainer.last_credit["fallback"].tolist() == [False, True]
    torch.testing.assert_close(inputs["advantages"], torch.tensor([[2.0], [-1.0]]) * expected_w)


def _count_backbone_calls(trainer) -> list[int]:
    """Count non-generation forward passes of the backbone (TRL's scoring passes run with use_cache=False)."""
    calls = [0]

    def hook(module, args, kwargs):
        calls[0] += kwargs.get("use_cache") is False

    backbone(trainer.model).register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.fixture(scope="module")
def plain_trl_calls(tmp_path_factory) -> dict[float, int]:
    """Backbone scoring passes in one step of plain TRL GRPO, per beta (run once for the module)."""
    counts = {}
    for beta in (0.0, 0.04):
        plain = GRPOTrainer(
            model=model_with_eos(),
            reward_funcs=letter_reward,
            args=config(tmp_path_factory.mktemp("plain"), max_steps=1, beta=beta),
            train_dataset=prompts(),
            processing_class=tiny_tokenizer(),
            peft_config=lora(),
        )
        calls = _count_backbone_calls(plain)
        plain.train()
        counts[beta] = calls[0]
    return counts


@pytest.mark.parametrize(
    ("method", "beta", "reference", "extra"),
    [
        ("arca", 0.04, "matched", 0),
        ("kl", 0.04, "matched", 0),
        ("arca", 0.0, "matched", 2),
        ("entropy_reduction", 0.0, "matched", 2),
        ("surprisal", 0.0, "matched", 0),
        ("arca_local", 0.04, "matched", 0),
        ("arca_local", 0.0, "matched", 0),
        ("arca", 0.04, "reuse", 0),
        ("arca", 0.0, "reuse", 2),
    ],
)
def test_forward_passes_beyond_plain_trl(tmp_path, plain_trl_calls, method, beta, reference, extra):
    ours = make_trainer(tmp_path, method, credit_kwargs={"reference": reference}, max_steps=1, beta=beta)
    our_calls = _count_backbone_calls(ours)
    ours.train()
    # One step = 2 micro-batches, plus TRL's reference pass in 2 chunks when beta > 0 (replaced by one matched
    # adapter-off pass per micro-batch in `matched` mode); with beta == 0 the reference methods pay one
    # adapter-off pass per micro-batch. arca_local never needs one.
    assert plain_trl_calls == {0.0: 2, 0.04: 4}
    assert our_calls[0] == plain_trl_calls[beta] + extra


def test_layer_module_matches_hf_hidden_states():
    model = tiny_model(num_hidden_layers=3)
    decoder = backbone(model)
    kept = {}
    for layer in (0, 1, -2, -1, 3):
        layer_module(decoder, layer).register_forward_hook(
            lambda m, a, out, layer=layer: kept.__setitem__(layer, getattr(out, "last_hidden_state", out))
        )
    hidden = model(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states
    for layer, value in kept.items():
        torch.testing.assert_close(value, hidden[layer], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^credit_layer: must be in \[-4, 3\] for this model"):
        layer_module(decoder, 4)


def test_setup_errors_name_the_fix(tmp_path):
    def build(args, **kwargs):
        return CreditGRPOTrainer(
            model=tiny_model(),
            reward_funcs=letter_reward,
            args=args,
            train_dataset=prompts(),
            processing_class=tiny_tokenizer(),
            **kwargs,
        )

    with pytest.raises(ValueError, match=r"^top_entropy_quantile: would mask tokens on top of credit_method 'arca'"):
        config(tmp_path, "arca", top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="peft_config"):
        build(config(tmp_path, "arca"))
    with pytest.raises(ValueError, match=r"^args: CreditGRPOTrainer needs a CreditGRPOConfig"):
        build(config(tmp_path))
    with pytest.raises(ValueError, match=r"^credit: the credit comes from args"):
        build(config(tmp_path, "arca"), credit=CreditConfig("kl"))
    with pytest.raises(ValueError, match=r"^top_entropy_quantile: must equal"), pytest.warns(FutureWarning):
        build(config(tmp_path, top_entropy_quantile=0.5), peft_config=lora(), credit=CreditConfig("top_entropy"))


def test_deprecated_credit_keyword_with_a_plain_grpo_config(tmp_path):
    """`credit=` next to a plain GRPOConfig still works (one source: the keyword), with a FutureWarning."""
    with pytest.warns(FutureWarning, match="CreditGRPOConfig"):
        trainer = CreditGRPOTrainer(
            model=model_with_eos(),
            reward_funcs=letter_reward,
            args=config(tmp_path, max_steps=1),
            train_dataset=prompts(),
            processing_class=tiny_tokenizer(),
            peft_config=lora(),
            credit=CreditConfig("arca", reference="reuse"),
        )
    assert trainer.credit == CreditConfig("arca", reference="reuse") and not trainer._matched
    trainer.train()
    assert "credit/etr" in trainer.state.log_history[-2]


def test_credit_comes_from_args(tmp_path):
    trainer = make_trainer(tmp_path, "kl", credit_kwargs={"scheme": "rank", "mix": 0.5, "reference": "reuse"})
    assert trainer.credit == trainer.args.credit == CreditConfig("kl", scheme="rank", mix=0.5, reference="reuse")
    assert trainer.args.top_entropy_quantile == 1.0


# ---- top_entropy: the loss gets exactly the mean-1 weights the log reports ---------------------------------------


def test_top_entropy_loss_gets_the_logged_mean_one_weights(tmp_path):
    trainer = make_trainer(tmp_path, "top_entropy", max_steps=1)
    assert trainer.args.top_entropy_quantile == trainer.credit.top_entropy_quantile == 0.2  # set by the config
    masks, inner = [], trainer.get_high_entropy_mask
    trainer.get_high_entropy_mask = _chain(masks, trainer, inner)
    batch = one_batch(trainer)
    loss = trainer._compute_loss(trainer.model, batch)
    kept, c = masks[-1], trainer.last_credit  # TRL's (B, T) bool mask of this micro-batch
    mask = c["mask"].bool()
    k = kept.sum(1, keepdim=True)  # (B, 1) kept tokens per row
    expected = torch.where(k > 0, kept.float() * mask.sum(1, keepdim=True) / k.clamp_min(1), mask.float())
    torch.testing.assert_close(c["weights"], expected, rtol=1e-6, atol=1e-6)  # SPEC 3: T / k on kept tokens
    torch.testing.assert_close((c["weights"] * mask).sum(1), mask.sum(1).float())
    assert torch.equal(c["fallback"], k.squeeze(1) == 0)
    assert 0 < kept.sum() < mask.sum()
    # The loss is TRL's GRPO loss of the per-token advantages A_i * w_i,t, with no entropy mask on top.
    weighted = dict(batch, advantages=batch["advantages"][:, None] * c["weights"])
    trainer.top_entropy_quantile = 1.0
    torch.testing.assert_close(loss, GRPOTrainer._compute_loss(trainer, trainer.model, weighted), rtol=0, atol=0)
    # What the log reports is these weights.
    assert trainer._metrics["train"]["credit/max_weight"][-1] == pytest.approx(c["weights"].max().item())
    assert trainer._metrics["train"]["credit/fallback_rate"][-1] == pytest.approx(c["fallback"].float().mean().item())


def _chain(masks: list, trainer, inner):
    """Wrap `get_high_entropy_mask` so the test sees TRL's own mask before the trainer turns it into weights."""

    def wrapped(entropies, mask, threshold):
        masks.append(GRPOTrainer.get_high_entropy_mask(trainer, entropies, mask, threshold))
        return inner(entropies, mask, threshold)

    return wrapped


def one_batch(trainer) -> dict:
    """One generated and scored training micro-batch, as TRL hands it to `_compute_loss`."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


# ---- the permutation control (SPEC 3 `permute`) ----------------------------------------------------------------


def _padded_arca_batch(mask: torch.Tensor) -> tuple[dict, dict]:
    """(inputs, policy states) of a hand-made ARCA micro-batch whose residual norms all differ."""
    b, t = mask.shape
    policy = torch.randn(b, t, 32, generator=torch.Generator().manual_seed(0))
    ref = policy.clone()
    ref[..., 0] += torch.arange(1, b * t + 1, dtype=torch.float32).reshape(b, t)  # residual norm of token i: i + 1
    inputs = {
        "prompt_ids": torch.tensor([[1, 2], [3, 4]]),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.arange(b * t).reshape(b, t) + 5,
        "completion_mask": mask,
        "advantages": torch.tensor([2.0, -1.0]),
        REF_KEY.format("arca"): ref,
    }
    return inputs, {"arca": policy}


def test_permute_gives_a_permutation_of_the_unpermuted_advantages(tmp_path):
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    plain = make_trainer(tmp_path / "plain", "arca")
    permuted = make_trainer(tmp_path / "perm", "arca", credit_kwargs={"permute": True})
    assert permuted.credit.permute and not plain.credit.permute
    (a, states), (b, _) = _padded_arca_batch(mask), _padded_arca_batch(mask)
    plain._apply_credit(a, states)
    permuted._apply_credit(b, states)
    for row in range(2):
        valid = mask[row].bool()
        assert torch.equal(b["advantages"][row, valid].sort().values, a["advantages"][row, valid].sort().values)
        assert not torch.equal(b["advantages"][row], a["advantages"][row])  # 6! and 8! orders: not the identity
        assert torch.all(b["advantages"][row, ~valid] == 0)
    assert torch.equal(permuted.last_credit["fallback"], plain.last_credit["fallback"])
    again, _ = _padded_arca_batch(mask)
    permuted._apply_credit(again, states)
    assert torch.equal(again["advantages"], b["advantages"])  # seeded: same seed, step and rows
    permuted.state.global_step = 1
    later, _ = _padded_arca_batch(mask)
    permuted._apply_credit(later, states)
    assert not torch.equal(later["advantages"], b["advantages"])  # another optimizer step, another draw


def test_a_permuted_run_trains_on_permuted_weights(tmp_path):
    trainer = make_trainer(tmp_path, "arca", credit_kwargs={"permute": True})
    records = _record_credit(trainer)
    trainer.train()
    moved = False
    for r in records:
        unpermuted, _ = normalize(r["saliences"], r["mask"], **trainer.credit.normalization())
        torch.testing.assert_close(r["A_t"], r["A"][:, None] * r["weights"], rtol=0, atol=0)
        assert torch.equal(r["weights"].sort(1).values, unpermuted.sort(1).values)
        moved |= not torch.equal(r["weights"], unpermuted)
    assert moved and records[-1]["step"] == 1  # step 0 falls back to uniform (nothing to permute), step 1 moves
    with pytest.raises(ValueError, match=r"^credit_permute: uniform weights are all 1"):
        config(tmp_path, "uniform", {"permute": True})
