import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from arca.credit.config import CreditConfig
from arca.credit.signals import SIGNAL_NAMES, compute_signals, precision_sensitive
from arca.io import write_parquet
from arca.sampling.dump import (
    a32_signals,
    dump_schema,
    float32_saliences,
    group_advantages,
    signal_weights,
    token_table,
)
from arca.sampling.rollouts import generate
from tests.tiny import tiny_model, tiny_tokenizer

REFERENCE_COMPARING = ["entropy_reduction", "kl", "arca", "divergence"]
META = {"run": "arca-r4-s0", "method": "arca", "rank": 4, "seed": 0, "step": 3}
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])

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


def _adapter(tmp_path, trained: bool):
    """A saved LoRA adapter (trained: B ~ N(0, 0.1^2); else PEFT's fresh B = 0)."""
    _peft(trained).save_pretrained(tmp_path)
    return tmp_path


def _bf16_table(adapter_dir, batch_size: int = 4):
    """The dump of one checkpoint of a bf16 run: signals, weights and the float32 recomputation."""
    model = PeftModel.from_pretrained(tiny_model().to(torch.bfloat16), adapter_dir).eval()
    tok, credit = tiny_tokenizer(), CreditConfig(method="arca")
    rollouts = generate(model, tok, PROMPTS, samples=3, max_new_tokens=7, greedy=False, seed=0)
    weights = signal_weights(model, rollouts, credit, SIGNAL_NAMES, batch_size=batch_size)
    checked = a32_signals(torch.bfloat16)
    a32 = float32_saliences(model, rollouts, checked, credit.layer, batch_size=batch_size)
    df = token_table(rollouts, tok, ["p-a", "p-b"], REWARDS, weights, META, a32)
    return model, rollouts, a32, df


def test_a32_signals_only_below_float32():
    assert a32_signals(torch.float32) == []
    checked = a32_signals(torch.bfloat16)
    assert checked == precision_sensitive(SIGNAL_NAMES) and set(REFERENCE_COMPARING) <= set(checked)
    assert "arca_local" in checked and "surprisal" not in checked
    names = dump_schema(SIGNAL_NAMES, checked).names
    assert names[-len(checked) :] == [f"a32_{s}" for s in checked]  # after every a_/w_ pair
    assert not any(n.startswith("a32_") for n in dump_schema().names)


def test_bf16_dump_holds_float32_recomputation_equal_to_a_float32_model(tmp_path):
    adapter_dir = _adapter(tmp_path, trained=True)
    model, rollouts, a32, df = _bf16_table(adapter_dir, batch_size=6)
    checked = a32_signals(torch.bfloat16)
    assert df.columns.tolist() == dump_schema(SIGNAL_NAMES, checked).names
    pa.Table.from_pandas(df, schema=dump_schema(SIGNAL_NAMES, checked), preserve_index=False)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n)  # restored
    # By hand: the same bf16 weights held in float32 (bf16 -> float32 is exact), the same adapter and rollouts.
    hand = PeftModel.from_pretrained(tiny_model().to(torch.bfloat16).float(), adapter_dir).eval()
    want = compute_signals(hand, rollouts.input_ids, rollouts.attention_mask, rollouts.completion_mask, names=checked)
    p = rollouts.prompt_length
    for name in checked:
        torch.testing.assert_close(a32[name], want[name][:, p:], rtol=1e-6, atol=1e-7)
    mask = rollouts.completion_mask[:, p:].bool()
    row, pos = mask.nonzero(as_tuple=True)
    order = np.lexsort((pos.numpy(), rollouts.sample[row].numpy(), rollouts.prompt_index[row].numpy()))
    np.testing.assert_array_equal(df["a32_arca"].to_numpy(), want["arca"][:, p:][row, pos].numpy()[order])
    assert (df["a32_arca"] > 0).all() and not np.array_equal(df["a_arca"], df["a32_arca"])  # bf16 is not exact


def test_bf16_fresh_lora_reference_signals_are_exactly_zero_and_fall_back(tmp_path):
    df = _bf16_table(_adapter(tmp_path, trained=False))[3]
    for name in [*REFERENCE_COMPARING, "arca_local"]:
        assert (df[f"a_{name}"] == 0).all(), name  # identical passes: no rounding noise at B = 0
        assert (df[f"w_{name}"] == 1).all(), name  # every trajectory falls back to uniform
        assert (df[f"a32_{name}"] == 0).all(), name


def test_float32_dump_has_no_a32_columns():
    _, df = _table(trained=True)
    assert not any(c.startswith("a32_") for c in df.columns)
    assert df.columns.tolist() == dump_schema().names


def test_bf16_dump_bytes_are_deterministic(tmp_path):
    adapter_dir = _adapter(tmp_path / "adapter", trained=True)
    schema = dump_schema(SIGNAL_NAMES, a32_signals(torch.bfloat16))
    paths = [tmp_path / f"dump-{i}.parquet" for i in range(2)]
    for path in paths:
        write_parquet(path, _bf16_table(adapter_dir)[3], schema=schema, metadata={"arca.dtype": "bfloat16"})
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert pq.read_schema(paths[0]).metadata[b"arca.dtype"] == b"bfloat16"
