"""How often a step sweeps the vocabulary, and that what it skips is taken from TRL exactly (issue 19): the
matched adapter-off pass runs the backbone alone where nothing reads its log-probs, and logit signals take the
per-token log-prob and entropy TRL's loss forward already computed when its head is float32."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils

import arca.credit.signals as signals_module
from arca.credit.vocab import float_head, vocab_stats
from arca.grpo.capture import loss_mask
from tests.grpo.test_trainer import make_trainer, model_with_eos, one_batch
from tests.grpo.test_trainer_precision import fill_lora_b, record_credit


def count_sweeps(monkeypatch) -> dict[str, list]:
    """Count TRL's fused-head calls (one vocabulary sweep each) and record the sides of each of our sweeps."""
    seen: dict[str, list] = {"trl": [], "ours": []}
    kernel, ours = trl_utils._ChunkedLogProbFunction, signals_module.vocab_stats

    class Counted(kernel):
        @staticmethod
        def forward(ctx, *args):
            seen["trl"].append(1)
            return kernel.forward(ctx, *args)

    def recorded(sides, *args, **kwargs):
        seen["ours"].append(["policy" if sides[0] is not None else None, "ref" if len(sides) == 2 else None])
        return ours(sides, *args, **kwargs)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counted)
    monkeypatch.setattr(signals_module, "vocab_stats", recorded)
    return seen


# One step = 2 micro-batches; plain TRL sweeps twice at beta = 0 (the loss forwards) and four times at beta > 0
# (plus its reference pass in 2 chunks, which `matched` replaces by one adapter-off pass per micro-batch).
@pytest.mark.parametrize(
    ("method", "beta", "trl_sweeps", "our_sides"),
    [
        ("arca", 0.0, 2, []),  # backbone-only adapter-off pass: no head at all
        ("arca", 0.04, 4, []),
        ("arca_local", 0.0, 2, []),
        ("surprisal", 0.0, 2, []),  # log-prob from the loss forward
        ("entropy_drop", 0.04, 4, []),
        ("divergence", 0.04, 4, []),  # both sides from TRL's passes
        ("entropy_reduction", 0.0, 4, []),  # its adapter-off pass goes through TRL for the entropy
        ("kl", 0.0, 2, [["policy", "ref"]] * 2),  # needs both full distributions: our sweep, backbone-only ref
        ("kl", 0.04, 4, [["policy", "ref"]] * 2),
    ],
)
def test_vocabulary_sweeps_per_step(tmp_path, monkeypatch, method, beta, trl_sweeps, our_sides):
    seen = count_sweeps(monkeypatch)
    trainer = make_trainer(tmp_path, method, beta=beta, max_steps=1)
    records = record_credit(trainer)
    trainer.train()
    assert len(records) == 2
    assert len(seen["trl"]) == trl_sweeps
    assert seen["ours"] == our_sides


def test_a_low_precision_head_keeps_our_float32_sweep(tmp_path, monkeypatch):
    """TRL's bf16 head is not SPEC 2's float32 log-softmax: the signal sweeps the policy side itself, unless
    `cast_lm_head_to_fp32` makes TRL's head float32. (The bf16 noise probe sweeps both sides besides.)"""
    seen = count_sweeps(monkeypatch)
    bf16 = make_trainer(tmp_path, "surprisal", model=model_with_eos().to(torch.bfloat16), max_steps=1)
    bf16.train()
    assert [s for s in seen["ours"] if s[1] is None] == [["policy", None]] * 2
    seen["ours"].clear()
    cast = make_trainer(
        tmp_path, "surprisal", model=model_with_eos().to(torch.bfloat16), max_steps=1, cast_lm_head_to_fp32=True
    )
    cast.train()
    assert [s for s in seen["ours"] if s[1] is None] == []


@pytest.mark.parametrize("method", ["divergence", "entropy_reduction"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_fresh_lora_is_exactly_zero_with_trl_statistics(tmp_path, method, beta):
    """SPEC 2b with both sides from TRL's passes, in bf16 with TRL's head cast to float32."""
    model = model_with_eos().to(torch.bfloat16)
    trainer = make_trainer(
        tmp_path, method, model=model, beta=beta, learning_rate=0.0, max_steps=1, cast_lm_head_to_fp32=True
    )
    assert trainer._given_policy and trainer._given_ref
    records = record_credit(trainer)
    trainer.train()
    assert records and all(torch.all(r["saliences"] == 0) for r in records)


@pytest.mark.parametrize("adapter", [True, False])
def test_trl_statistics_equal_our_sweep(tmp_path, adapter):
    """TRL's per-token log-prob and entropy against `vocab_stats` on the very states of the same pass: equal to
    float32 rounding (1e-6), not bit for bit. TRL sums exp over 32768-column vocabulary tiles with a running max
    (online logsumexp) and takes the entropy as logsumexp - E[z]; ours is `log_softmax` and -sum p log p."""
    trainer = make_trainer(tmp_path, "surprisal", max_steps=1)
    fill_lora_b(trainer)
    batch = one_batch(trainer)
    states, stats = trainer._salience_pass(trainer.model, batch, adapter=adapter, head=True)
    mask = loss_mask(batch).bool()  # (B, T)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    hidden = states["final"].reshape(mask.numel(), -1)  # (B*T, H)
    head = float_head(trainer.model.get_output_embeddings())
    ours = vocab_stats([(hidden, head)], batch["completion_ids"].reshape(-1), rows, trainer.temperature, 64)
    prefix = "" if adapter else "ref_"
    for key in ("logp", "entropy"):
        theirs = stats[prefix + key][mask].float()
        assert theirs.abs().max() > 0.1  # real values, not zeros
        torch.testing.assert_close(theirs, ours[key], rtol=1e-6, atol=1e-6)  # measured: <= 3.1e-7 relative
