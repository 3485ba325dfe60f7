"""float32 recomputation is exact to restore; noise share and rank correlation by hand."""

from __future__ import annotations

import math

import pandas as pd
import torch
from peft import LoraConfig, get_peft_model

from arca.credit.precision import float32_weights, noise_share, rank_correlation
from tests.tiny import tiny_model


def test_float32_weights_restores_bits_and_keeps_float32_adapter():
    model = get_peft_model(tiny_model().to(torch.bfloat16), LoraConfig(r=2, target_modules="all-linear"))
    lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora.data = lora.data.float()  # PEFT keeps adapters in float32 beside a bf16 base
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(4, 100, (2, 6))
    with float32_weights(model):
        assert all(p.dtype == torch.float32 for p in model.parameters())
        out32 = model(input_ids=ids).logits
    assert out32.dtype == torch.float32
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


def test_noise_share_by_hand():
    a32 = torch.tensor([[3.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert noise_share(a32 + torch.tensor([[0.0, 5.0, 1.0]]), a32, mask) == 1.0  # ||(0, 5)|| / ||(3, 4)||
    assert noise_share(torch.zeros(1, 3), torch.zeros(1, 3), mask) == 0.0
    assert math.isinf(noise_share(torch.ones(1, 3), torch.zeros(1, 3), mask))


def test_rank_correlation_is_mean_row_spearman():
    torch.manual_seed(0)
    a32 = torch.rand(3, 7)
    a = a32 + 0.3 * torch.rand(3, 7)
    a[0, 2] = a[0, 3]  # a tie
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 4:] = 0
    rows = [(a[i][mask[i] == 1].numpy(), a32[i][mask[i] == 1].numpy()) for i in range(3)]
    ranked = [(pd.Series(x).rank(), pd.Series(y).rank()) for x, y in rows]  # Spearman = Pearson of ranks
    want = sum(rx.corr(ry) for rx, ry in ranked) / 3
    assert abs(rank_correlation(a, a32, mask) - want) < 1e-12
    assert math.isnan(rank_correlation(torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1)))
