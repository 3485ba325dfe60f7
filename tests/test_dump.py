import numpy as np
import pyarrow as pa
import pytest
import torch
from peft import LoraConfig, get_peft_model

from arca.credit_config import CreditConfig
from arca.dump import dump_schema, group_advantages, signal_weights, token_table
from arca.rollouts import generate
from arca.signals import SIGNAL_NAMES
from tests.tiny import tiny_model, tiny_tokenizer

PROMPTS = [[{"role": "user", "content": "1+1"}], [{"role": "user", "content": "what is 22 + 3?"}]]


def _peft(trained: bool):
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if trained:
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model


def _table(trained: bool):
    model, tok = _peft(trained), tiny_tokenizer()
    rollouts = generate(model, tok, PROMPTS, samples=3, max_new_tokens=7, greedy=False, seed=0)
    weights = signal_weights(model, rollouts, CreditConfig(method="arca"), SIGNAL_NAMES, batch_size=4)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    meta = {"run": "arca-r4-s0", "method": "arca", "rank": 4, "seed": 0, "step": 3}
    return rollouts, token_table(rollouts, tok, ["p-a", "p-b"], rewards, weights, meta)


def test_token_table_matches_schema_and_masks():
    rollouts, df = _table(trained=True)
    assert len(df) == int(rollouts.completion_mask.sum())
    table = pa.Table.from_pandas(df, schema=dump_schema(), preserve_index=False)  # raises on a type mismatch
    assert table.schema.names == dump_schema().names
    assert df[["prompt_id", "sample", "pos"]].equals(
        df[["prompt_id", "sample", "pos"]].sort_values(["prompt_id", "sample", "pos"]).reset_index(drop=True)
    )
    per_traj = df.groupby(["prompt_id", "sample"])
    for s in SIGNAL_NAMES:  # credit-preserving: each trajectory's weights have mean 1
        np.testing.assert_allclose(per_traj[f"w_{s}"].mean().to_numpy(), 1.0, rtol=1e-5)
    assert (df["w_uniform"] == 1).all()
    assert (df["a_arca"] > 0).all()  # a trained LoRA moves every hidden state


def test_fresh_lora_arca_falls_back_to_uniform():
    _, df = _table(trained=False)
    assert (df["a_arca"] == 0).all()
    assert (df["w_arca"] == 1).all()


def test_group_advantages_follow_trl():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(r, torch.tensor([0, 0, 0, 1, 1, 1]))
    g = r[:3]
    expected = (g - g.mean()) / (g.std() + 1e-4)
    torch.testing.assert_close(adv[:3], expected)
    assert (adv[3:] == 0).all()


def test_schema_has_every_signal_raw_and_weight():
    names = dump_schema().names
    for s in SIGNAL_NAMES:
        assert f"a_{s}" in names and f"w_{s}" in names
    assert dump_schema().field("rank").type == pa.int32()
    with pytest.raises(KeyError):
        dump_schema().field("missing")
