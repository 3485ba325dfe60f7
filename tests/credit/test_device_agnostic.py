"""Every tensor the library creates takes its device from its inputs (issue 22, fix 1).

No GPU is needed to catch the class of bug: under `torch.set_default_device("meta")`, any constructor without
`device=` makes a meta tensor, and mixing it with the CPU inputs raises (or returns a meta result), exactly as a
CPU constructor mixed with CUDA inputs does on a GPU. Each entry point runs on CPU inputs under that default and
must return CPU tensors with the values it gives without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor

import arca
from arca.credit import diagnostics
from arca.credit import normalize as credit
from arca.credit.lora_local import capture_lora_norms, lora_layers, lora_output_norm
from arca.credit.precision import noise_share, rank_correlation
from arca.credit.signals import compute_signals, signals_from_states
from arca.credit.vocab import vocab_stats
from arca.grpo.noise_probe import NoiseProbe
from tests.tiny import tiny_model


@contextmanager
def meta_default() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def same_on_meta(fn: Callable[[], Any]) -> None:
    """`fn()` under the meta default device equals `fn()` without it, and every tensor in it is on the CPU."""
    expected = fn()
    with meta_default():
        got = fn()
    assert_same(got, expected)


def assert_same(got: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, (tuple, list)):
        for g, e in zip(got, expected, strict=True):
            assert_same(g, e)
    elif isinstance(expected, Tensor):
        assert got.device.type == "cpu", f"a {got.device.type} tensor came back"
        torch.testing.assert_close(got, expected, equal_nan=True)
    elif isinstance(expected, np.ndarray):
        np.testing.assert_allclose(got, expected, equal_nan=True)
    else:
        assert got == expected or (got != got and expected != expected)  # NaN == NaN here


def peft_tiny() -> torch.nn.Module:
    model = get_peft_model(tiny_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3  # B = 0 would make every signal 0
    return model.eval()


def batch() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (2, 7), generator=generator)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # left padding
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    return ids, attention, completion


def test_precision_rank_correlation_and_noise_share():
    generator = torch.Generator().manual_seed(1)
    a32 = torch.rand(3, 8, generator=generator)
    a = (a32 + 0.2 * torch.rand(3, 8, generator=generator)).round(decimals=1)  # ties
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[2, 5:] = 0
    same_on_meta(lambda: rank_correlation(a, a32, mask))
    same_on_meta(lambda: noise_share(a, a32, mask))


def test_signals_from_model_and_from_states():
    model = peft_tiny()
    ids, attention, completion = batch()
    same_on_meta(lambda: compute_signals(model, ids, attention, completion, layer=-2))
    generator = torch.Generator().manual_seed(2)
    hidden, ref = torch.randn(2, 6, 32, generator=generator), torch.randn(2, 6, 32, generator=generator)
    norms, mask = torch.rand(2, 6, generator=generator), completion[:, 1:]
    head = model.get_output_embeddings()
    same_on_meta(lambda: signals_from_states(ids[:, 1:], mask, hidden, head, ref, lora_norms=norms))


def test_vocab_sweep():
    generator = torch.Generator().manual_seed(4)
    states, head = torch.randn(6, 8, generator=generator), (torch.randn(20, 8, generator=generator), None)
    targets, rows = torch.randint(0, 20, (6,), generator=generator), torch.tensor([0, 2, 3, 5])
    same_on_meta(lambda: vocab_stats([(states, head), (states * 0.9, head)], targets, rows, 1.0, 3))
    same_on_meta(lambda: vocab_stats([(states, head)], targets, rows[:0], 1.0, 3))  # no valid token


@pytest.mark.parametrize("scheme", ["mean", "softmax", "rank"])
def test_credit_normalization_mix_and_clip(scheme: str):
    generator = torch.Generator().manual_seed(5)
    saliences = torch.rand(3, 6, generator=generator)
    saliences[1] = 0.0  # a degenerate row: the uniform fallback
    mask = torch.ones(3, 6)
    mask[2, 4:] = 0
    same_on_meta(lambda: credit.normalize(saliences, mask, scheme=scheme, tau=0.5, mix=0.7, w_max=2.5))
    same_on_meta(lambda: credit.degenerate_rows(saliences, mask))
    weights, _ = credit.normalize(saliences, mask, scheme=scheme)
    same_on_meta(lambda: credit.mix_uniform(weights, mask, 0.5))
    same_on_meta(lambda: credit.clip_weights(weights, mask, 1.5))
    same_on_meta(lambda: credit.normalize(saliences.numpy(), mask.numpy(), scheme=scheme))  # numpy in: CPU out


def test_diagnostics():
    generator = torch.Generator().manual_seed(6)
    weights, mask = torch.rand(4, 9, generator=generator), torch.ones(4, 9)
    mask[3, 6:] = 0
    for fn in (diagnostics.gini, diagnostics.effective_token_ratio, diagnostics.top_k_mass):
        same_on_meta(lambda fn=fn: fn(weights, mask))
    agnostic = torch.rand(4, 9, generator=generator) > 0.5
    same_on_meta(lambda: diagnostics.agnostic_share(weights, mask, agnostic))


def test_lora_local_norms():
    model = peft_tiny()
    ids, attention, _ = batch()
    layer = lora_layers(model)[0]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(7))
    same_on_meta(lambda: lora_output_norm(layer, x))

    def captured() -> Tensor:
        with capture_lora_norms(model, 4) as capture, torch.no_grad():
            model(input_ids=ids, attention_mask=attention)
        return capture.norms()

    same_on_meta(captured)


def test_noise_probe():
    """The running probe of a bf16-weight run (the path that crashed every bf16 GPU run at its first log)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = peft_tiny()
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.to(torch.bfloat16)
    ids, attention, completion = batch()
    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton: start from and leave none
    probe = NoiseProbe(model, Accelerator(cpu=True), layer=-1, temperature=1.0, sharded=False)
    assert probe.enabled
    probe.keep(
        {
            "prompt_ids": ids[:, :4],
            "prompt_mask": attention[:, :4],
            "completion_ids": ids[:, 4:],
            "completion_mask": completion[:, 4:],
        }
    )
    same_on_meta(probe.measure)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_faithfulness_scores():
    if "faithfulness_scores" not in arca.__all__:
        pytest.skip("arca.faithfulness_scores is not in this checkout yet")
    generator = torch.Generator().manual_seed(8)
    weights = torch.rand(3, 10, generator=generator).round(decimals=1)  # ties
    decisive, mask = torch.rand(3, 10, generator=generator) > 0.6, torch.ones(3, 10, dtype=torch.bool)
    mask[2, 7:] = False
    same_on_meta(lambda: arca.faithfulness_scores(weights, decisive, mask))


def test_scaled_adapter():
    if "scaled_adapter" not in arca.__all__:
        pytest.skip("arca.scaled_adapter is not in this checkout yet")
    model = peft_tiny()
    ids, attention, completion = batch()

    def scaled() -> dict[str, Tensor]:
        with arca.scaled_adapter(model, 0.5):
            return compute_signals(model, ids, attention, completion, names=("arca", "kl", "arca_local"))

    same_on_meta(scaled)
