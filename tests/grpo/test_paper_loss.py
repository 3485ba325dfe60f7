"""The ARCA paper's loss against TRL's: does `loss_type="grpo"` with beta = 0, one iteration and no vLLM give the
paper's gradient? Both are computed on a tiny model, the TRL side through a real `GRPOTrainer.train()` step with
gradient accumulation, the paper side by hand on the same rollouts.

The paper (its `run_experiment.compute_loss`): per micro-batch of B completions,
    loss = -(A_i * sum_t w~_i,t * log pi(y_t)).mean(),   w~ summing to 1 over a completion's valid tokens,
then `(loss / grad_accum).backward()` per micro-batch, one optimizer step per accumulation window.
TRL "grpo" with per-token advantages `A_i * w_i,t` (our weights: mean 1, i.e. summing to T_i):
    per-token loss -(A_i w_i,t) * exp(logp - logp.detach())  (ratio 1, clipping inactive, gradient A_i w ∇logp)
    loss = mean_i( sum_t(per-token loss) / T_i ) / current_gradient_accumulation_steps.
Since w / T_i = w~, the two gradients are equal (factor 1), whatever the split into micro-batches of equal size.
`dapo` (our default) normalizes by the window's token count instead, which weighs completion i by T_i / sum_j T_j
rather than 1 / B: not a constant factor as soon as lengths differ, so the paper profile needs `loss_type: grpo`.

Advantages differ slightly: TRL `(r - mean) / (std + 1e-4)`, the paper `(r - mean) / max(std, 1e-8)`, both with
the sample (Bessel) std of the K rewards of a prompt. TRL's is the paper's times `std / (std + 1e-4)`, a factor
that depends on the group (0.99980 for 1 or 3 correct of 4, 0.99983 for 2 of 4, binary rewards), and both are 0
for a group with equal rewards: at most 2e-4 relative, not a constant factor, negligible next to sampling noise.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from tests.tiny import tiny_model, tiny_tokenizer

GROUP = 4  # K completions per prompt (the paper's)
ACCUMULATION = 2  # micro-batches per optimizer step
MICRO = 4  # completions per micro-batch


def parity_reward(completions, completion_ids, **kwargs) -> list[float]:
    """A binary reward that varies inside groups: whether the completion's token ids sum to an even number."""
    parity_reward.seen.extend(tuple(ids) for ids in completion_ids)
    rewards = [float(sum(ids) % 2 == 0) for ids in completion_ids]
    parity_reward.rewards.extend(rewards)
    return rewards


def known_weights(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) non-uniform credit weights with mean 1 over each completion's valid tokens (as our trainer's)."""
    raw = (torch.arange(mask.shape[1], dtype=torch.float32) % 3 + 0.5).expand_as(mask) * mask  # (B, T)
    return raw * mask.sum(-1, keepdim=True) / raw.sum(-1, keepdim=True).clamp(min=1e-12)


class WeightedGRPOTrainer(GRPOTrainer):
    """TRL's GRPO; the only change: each micro-batch's advantages become `(B, T)` `A_i * w_i,t` (the seam our
    `CreditGRPOTrainer` uses, which TRL's loss accepts), and every micro-batch is kept for the comparison."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches: list[dict[str, torch.Tensor]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = known_weights(inputs["completion_mask"].float())
        kept = {
            k: inputs[k].detach().clone() for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        }
        self.micro_batches.append({**kept, "advantages": inputs["advantages"].detach().clone(), "weights": weights})
        inputs = {**inputs, "advantages": inputs["advantages"].unsqueeze(1) * weights}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class KeepGradients(TrainerCallback):
    """The accumulated gradients of the one optimizer step (clipping is off in this test)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def trl_step(tmp_path, loud_eos: bool = True) -> tuple[WeightedGRPOTrainer, dict[str, torch.Tensor], torch.nn.Module]:
    """One optimizer step of TRL GRPO (2 prompts x K = 4, 2 micro-batches of 4): (trainer, gradients, model before).

    `loud_eos` scales the EOS row of the LM head so completions stop at varied lengths (1 / T_i differs per row);
    without it every completion runs to the length cap and all are distinct.
    """
    parity_reward.seen, parity_reward.rewards = [], []
    model = tiny_model()
    if loud_eos:
        with torch.no_grad():
            model.lm_head.weight[tiny_tokenizer().eos_token_id] *= 40.0
    before = copy.deepcopy(model)  # the parameters the step's gradients are taken at
    prompts = [[{"role": "user", "content": q}] for q in ("what is 1+1?", "name a prime.")]
    args = GRPOConfig(
        output_dir=str(tmp_path),
        loss_type="grpo",
        beta=0.0,
        num_iterations=1,
        use_vllm=False,
        num_generations=GROUP,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATION,
        max_completion_length=8,
        max_steps=1,
        max_grad_norm=0.0,  # no clipping: compare raw gradients
        learning_rate=1e-3,
        temperature=1.0,
        top_k=0,
        seed=0,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
    )
    keep = KeepGradients()
    trainer = WeightedGRPOTrainer(
        model=model,
        reward_funcs=[parity_reward],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tiny_tokenizer(),
        callbacks=[keep],
    )
    trainer.train()
    return trainer, keep.grads, before


def paper_gradient(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The paper's loss, written out: per micro-batch -(A * sum_t w~ log pi).mean(), divided by the accumulation."""
    model.zero_grad(set_to_none=True)
    for batch in micro_batches:
        prompt_len = batch["prompt_ids"].shape[1]
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P + T)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, prompt_len - 1 : -1]  # (B, T, V)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
        mask = batch["completion_mask"].float()  # (B, T)
        weights_sum_one = batch["weights"] / mask.sum(-1, keepdim=True)  # (B, T), sums to 1 per completion
        objective = (weights_sum_one * logp * mask).sum(-1)  # (B,)
        loss = -(batch["advantages"] * objective).mean()
        (loss / len(micro_batches)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_trl_grpo_loss_is_the_papers_with_factor_one(tmp_path):
    trainer, trl_grads, before = trl_step(tmp_path)
    assert len(trainer.micro_batches) == ACCUMULATION
    assert all(b["completion_ids"].shape[0] == MICRO for b in trainer.micro_batches)
    assert any(b["advantages"].abs().sum() > 0 for b in trainer.micro_batches), "no mixed group: nothing to compare"
    lengths = torch.cat([b["completion_mask"].sum(-1) for b in trainer.micro_batches])
    assert len(set(lengths.tolist())) > 2, f"completion lengths {lengths.tolist()}: too uniform to test 1 / T_i"
    for batch in trainer.micro_batches:  # the weights TRL saw were non-uniform, mean 1 per completion
        mask = batch["completion_mask"].float()
        torch.testing.assert_close((batch["weights"] * mask).sum(-1), mask.sum(-1))
        assert batch["weights"][mask.bool()].std() > 0.1
    paper = paper_gradient(before, trainer.micro_batches)
    assert set(paper) == set(trl_grads) and len(paper) > 0
    scale = max(g.abs().max().item() for g in paper.values())
    assert scale > 0
    for name, grad in paper.items():
        torch.testing.assert_close(trl_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_trl_advantage_against_the_papers(tmp_path):
    """TRL's advantage is the paper's times std / (std + 1e-4) per group: within 2e-4, zero for equal rewards."""
    trainer, _, _ = trl_step(tmp_path, loud_eos=False)
    seen, rewards = parity_reward.seen, torch.tensor(parity_reward.rewards)
    assert len(set(seen)) == len(seen), "two completions share their ids: rows cannot be matched to groups"
    grouped = rewards.view(-1, GROUP)  # (prompts, K): TRL scores each prompt's K completions consecutively
    std = grouped.std(dim=1, keepdim=True)  # sample std, as both codes use
    paper = ((grouped - grouped.mean(dim=1, keepdim=True)) / std.clamp_min(1e-8)).flatten()
    factor = (std / (std + 1e-4)).expand_as(grouped).flatten()
    row = {ids: i for i, ids in enumerate(seen)}
    for batch in trainer.micro_batches:
        for ids, mask, trl_advantage in zip(batch["completion_ids"], batch["completion_mask"], batch["advantages"]):
            i = row[tuple(ids[mask.bool()].tolist())]
            torch.testing.assert_close(trl_advantage, paper[i] * factor[i], rtol=1e-5, atol=1e-7)
            assert abs(trl_advantage - paper[i]) <= 2e-4 * abs(paper[i]) + 1e-7
    for correct, expected in ((1, 0.99980), (2, 0.99983)):  # K = 4 binary rewards: std 0.5 and 0.577
        group_std = torch.tensor([1.0] * correct + [0.0] * (GROUP - correct)).std()
        assert abs((group_std / (group_std + 1e-4)).item() - expected) < 1e-5
