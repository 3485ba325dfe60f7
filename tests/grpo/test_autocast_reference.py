"""The float32 reference is float32 inside a mixed-precision run (issue 22, fix 2).

Accelerate's `prepare` with `mixed_precision="bf16"` wraps the model's `forward` in bf16 autocast (on CPU too),
and that inner autocast used to override `float32_weights`' own `autocast(enabled=False)`; the float32 sweeps
(`vocab_stats`, `arca_local`'s recompute) ran under the step's autocast. Each is compared with a plain float32
pass of an unwrapped copy of the same model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from peft import LoraConfig, get_peft_model

from arca.credit.lora_local import lora_layers, lora_output_norm
from arca.credit.precision import float32_weights
from arca.credit.signals import compute_signals
from arca.credit.vocab import vocab_stats
from arca.grpo.noise_probe import NOISE_SIGNALS, NoiseProbe
from tests.tiny import tiny_model


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate's state is a process-wide singleton: an earlier `Accelerator(cpu=True)` would pin
    mixed precision off for the bf16 one built here."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def peft_tiny() -> torch.nn.Module:
    model = get_peft_model(tiny_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
    return model.eval()


def bf16_prepared(model: torch.nn.Module) -> torch.nn.Module:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = accelerator.prepare(model)
    assert "forward" in prepared.__dict__  # Accelerate's autocast wrapper is in place
    return prepared


def down_proj_dtypes(model: torch.nn.Module, ids: torch.Tensor) -> set[torch.dtype]:
    """dtypes of every `down_proj` output in one forward of `model`."""
    seen: set[torch.dtype] = set()
    handles = [
        m.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
        for name, m in model.named_modules()
        if name.endswith("down_proj.base_layer")
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_float32_weights_undoes_accelerate_autocast_wrapper():
    plain = peft_tiny()
    model = bf16_prepared(copy.deepcopy(plain))
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    assert down_proj_dtypes(model, ids) == {torch.bfloat16}  # the wrapper is on: the run's precision
    with float32_weights(model):
        assert down_proj_dtypes(model, ids) == {torch.float32}
        with torch.no_grad():
            got = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    with torch.no_grad():
        expected = plain(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert down_proj_dtypes(model, ids) == {torch.bfloat16}  # the wrapper is back after the block


def test_noise_probe_reference_matches_plain_float32():
    plain = peft_tiny()
    model = bf16_prepared(copy.deepcopy(plain))
    ids = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    attention, scored = torch.ones_like(ids), torch.zeros_like(ids)
    scored[:, 4:] = 1
    with float32_weights(model):
        got = compute_signals(model, ids, attention, scored, names=NOISE_SIGNALS)
    expected = compute_signals(plain, ids, attention, scored, names=NOISE_SIGNALS)
    for name in NOISE_SIGNALS:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    probe = NoiseProbe(model, Accelerator(cpu=True, mixed_precision="bf16"), -1, 1.0, sharded=False)
    probe.probe = (ids, attention, scored)
    noise = probe.measure()
    assert all(noise[f"noise_{name}"] > 0 for name in NOISE_SIGNALS)  # the low pass really is bf16


def test_float32_sweeps_ignore_the_steps_autocast():
    generator = torch.Generator().manual_seed(2)
    states, head = torch.randn(6, 32, generator=generator), (torch.randn(50, 32, generator=generator), None)
    targets, rows = torch.randint(0, 50, (6,), generator=generator), torch.arange(6)
    layer = lora_layers(peft_tiny())[0]
    x = torch.randn(2, 5, layer.in_features, generator=generator)
    expected = vocab_stats([(states, head), (states * 0.9, head)], targets, rows, 1.0, 4), lora_output_norm(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss forward of a bf16 run
        got = vocab_stats([(states, head), (states * 0.9, head)], targets, rows, 1.0, 4), lora_output_norm(layer, x)
    for key in expected[0]:
        assert got[0][key].dtype == torch.float32
        torch.testing.assert_close(got[0][key], expected[0][key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
