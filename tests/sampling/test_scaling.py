"""`scaled_adapter` (SPEC 10's pi_c) and the relative update size, on a tiny Qwen3 with a random non-zero LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from arca import scaled_adapter
from arca.credit.lora_local import lora_layers
from arca.credit.precision import float32_weights
from arca.credit.signals import compute_signals
from arca.sampling.scaling import relative_update_size
from tests.tiny import tiny_model


def lora_model(seed: int = 0, scale: float = 0.3, dtype: torch.dtype = torch.float32):
    """Tiny Qwen3 + a rank-4 LoRA on every linear layer, B random (a trained adapter, not the B = 0 init)."""
    model = get_peft_model(tiny_model(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in lora_layers(model):
        b = layer.lora_B["default"].weight
        b.data = torch.randn(b.shape, generator=gen) * scale
    return model.to(dtype).eval()


def batch(seed: int = 0, n: int = 3, length: int = 12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 104, (n, length), generator=gen)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # one left-padded row
    return ids, attn


def outputs(model, ids, attn):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    return out.logits, out.hidden_states


def scalings(model) -> list[float]:
    return [layer.scaling[name] for layer in lora_layers(model) for name in layer.scaling]


def assert_same(a, b):
    logits_a, hidden_a = a
    logits_b, hidden_b = b
    assert torch.equal(logits_a, logits_b)
    assert all(torch.equal(x, y) for x, y in zip(hidden_a, hidden_b, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_is_the_reference_and_one_the_adapter_bit_for_bit(dtype):
    model = lora_model(dtype=dtype)
    ids, attn = batch()
    with model.disable_adapter():
        reference = outputs(model, ids, attn)
    adapter = outputs(model, ids, attn)
    assert not torch.equal(reference[0], adapter[0])  # the adapter does something
    with scaled_adapter(model, 0.0):
        assert_same(outputs(model, ids, attn), reference)
        with model.disable_adapter():  # the reference pass of arca.credit.signals inside the block
            assert_same(outputs(model, ids, attn), reference)
    with scaled_adapter(model, 1.0):
        assert_same(outputs(model, ids, attn), adapter)
    with scaled_adapter(model, 0.5):
        half = outputs(model, ids, attn)
    assert not torch.equal(half[0], adapter[0]) and not torch.equal(half[0], reference[0])


def test_every_scaling_is_restored_exactly_also_after_an_exception():
    model = lora_model()
    for layer in lora_layers(model)[::3]:
        layer.scaling["default"] = 1 / 3  # a float that c * x / c would not give back
    before = scalings(model)
    with scaled_adapter(model, 0.7):
        assert scalings(model) == [s * 0.7 for s in before]
    assert scalings(model) == before
    with pytest.raises(RuntimeError, match="boom"), scaled_adapter(model, 3.0):
        raise RuntimeError("boom")
    assert scalings(model) == before


def test_bad_scales_and_models_are_refused():
    model = lora_model()
    for c in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="c: the adapter scale"), scaled_adapter(model, c):
            pass
    with pytest.raises(ValueError, match="no LoRA layers"), scaled_adapter(tiny_model(), 1.0):
        pass


def test_arca_local_includes_c_and_the_reference_signals_vanish_at_zero():
    model = lora_model()
    ids, attn = batch()
    cmask = attn.clone()
    cmask[:, :4] = 0
    names = ["arca_local", "arca", "kl"]
    with scaled_adapter(model, 0.25):
        quarter = compute_signals(model, ids, attn, cmask, names=names)
    for layer in lora_layers(model):  # the same policy with B itself scaled: s_m in arca_local must carry c
        layer.lora_B["default"].weight.data *= 0.25
    scaled_b = compute_signals(model, ids, attn, cmask, names=names)
    for name in names:
        torch.testing.assert_close(quarter[name], scaled_b[name], rtol=1e-4, atol=1e-6)
    assert quarter["arca_local"].abs().sum() > 0
    with scaled_adapter(model, 0.0):
        zero = compute_signals(model, ids, attn, cmask, names=names)
    assert all(torch.equal(zero[n], torch.zeros_like(zero[n])) for n in names)


def test_relative_update_size_is_linear_in_c_and_matches_the_dense_product():
    model = lora_model()
    size = relative_update_size(model, 1.0)
    dense = [layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
             for layer in lora_layers(model)]  # fmt: skip
    update = sum(float(d.detach().pow(2).sum()) for d in dense)
    base = sum(float(layer.get_base_layer().weight.pow(2).sum()) for layer in lora_layers(model))
    assert size == pytest.approx(math.sqrt(update / base), rel=1e-5)
    for c in (0.0, 0.01, 0.3, 2.0):
        assert relative_update_size(model, c) == pytest.approx(c * size, rel=1e-6, abs=0)
    with scaled_adapter(model, 0.5):  # reads the live scaling, so pi_c's own size is c times the adapter's
        assert relative_update_size(model) == pytest.approx(0.5 * size, rel=1e-6)
    untrained = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert relative_update_size(untrained) == 0.0


def test_scaled_adapter_inside_float32_weights_of_a_bf16_model():
    model = lora_model(dtype=torch.bfloat16)
    ids, attn = batch()
    with float32_weights(model), scaled_adapter(model, 0.0):
        zero = outputs(model, ids, attn)
        with model.disable_adapter():
            reference = outputs(model, ids, attn)
    assert zero[0].dtype == torch.float32
    assert_same(zero, reference)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
