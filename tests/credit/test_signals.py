"""Signals against a plain two-forward, full-logits computation on a tiny LoRA'd Qwen3."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from arca.credit import signals as sig
from arca.credit.signals import SIGNAL_NAMES, compute_signals, needs_logits, needs_reference, signals_from_states
from tests.tiny import tiny_model


def lora_model(trained: bool = True, num_hidden_layers: int = 2):
    # Dropout 0.5 makes any pass that forgot eval mode disagree with the manual (eval) computation.
    config = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5)
    model = get_peft_model(tiny_model(num_hidden_layers=num_hidden_layers), config)
    if trained:  # a fresh LoRA has B = 0, so adapter on == adapter off; make them differ
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
    return model


def batch():
    """Right-padded rows of different lengths: prompt of 3 tokens, then completions of 5, 2 and 0 tokens."""
    torch.manual_seed(2)
    lengths = [8, 5, 3]
    input_ids = torch.randint(4, 104, (3, 8))
    attention_mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).long()  # (B, L)
    input_ids = input_ids * attention_mask  # pad id 0
    completion_mask = attention_mask.clone()
    completion_mask[:, :3] = 0
    return input_ids, attention_mask, completion_mask


def manual_lora_norms(model, input_ids, attention_mask):
    """(B, L) sum over LoRA linears of ||s * B A x||, each module's product written out by hand in float64."""
    model.eval()  # no LoRA dropout anywhere upstream
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A"):
            handles.append(module.register_forward_hook(lambda m, args, out, n=name: inputs.__setitem__(n, args[0])))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    for h in handles:
        h.remove()
    total = torch.zeros(input_ids.shape, dtype=torch.float64)
    modules = dict(model.named_modules())
    for name, x in inputs.items():
        m = modules[name]
        a, b = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
        total += (x.double() @ a.T @ b.T * m.scaling["default"]).norm(dim=-1)
    return total


def manual_signals(model, input_ids, attention_mask, completion_mask, temperature=1.0, layer=-1):
    model.eval()
    lora_norms = manual_lora_norms(model, input_ids, attention_mask)  # (B, L)
    with torch.no_grad():
        on = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        with model.disable_adapter():
            off = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    logp = torch.log_softmax(on.logits[:, :-1] / temperature, -1)  # (B, L-1, V)
    logq = torch.log_softmax(off.logits[:, :-1] / temperature, -1)
    h_theta = -(logp.exp() * logp).sum(-1)
    h_ref = -(logq.exp() * logq).sum(-1)
    raw = {
        "uniform": torch.ones_like(h_theta),
        "surprisal": -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1),
        "entropy": h_theta,
        "entropy_reduction": (h_ref - h_theta).clamp_min(0),
        "kl": (logp.exp() * (logp - logq)).sum(-1),
        "arca": (on.hidden_states[layer] - off.hidden_states[layer])[:, :-1].norm(dim=-1),
        "arca_local": lora_norms[:, :-1].float(),
    }
    logp_y, logq_y = -raw["surprisal"], logq.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    raw["divergence"] = (logp_y - logq_y).abs()
    mask = completion_mask[:, 1:].float()
    drop = torch.zeros_like(h_theta)  # the paper's loop: H_t - H_t+1 while t + 1 is still a valid token
    for i in range(drop.shape[0]):
        for t in range(drop.shape[1] - 1):
            if mask[i, t] and mask[i, t + 1]:
                drop[i, t] = max(h_theta[i, t] - h_theta[i, t + 1], 0.0)
    raw["entropy_drop"] = drop
    return {k: torch.nn.functional.pad(v * mask, (1, 0)) for k, v in raw.items()}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_compute_signals_matches_manual(temperature):
    model = lora_model()
    model.train()  # LoRA dropout must be off inside; the mode must come back
    ids, attn, comp = batch()
    got = compute_signals(model, ids, attn, comp, temperature=temperature, chunk_tokens=4)
    assert model.training and set(got) == set(SIGNAL_NAMES)
    want = manual_signals(model, ids, attn, comp, temperature)
    for name in SIGNAL_NAMES:
        assert got[name].shape == ids.shape and got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
        assert (got[name][comp == 0] == 0).all(), name
    assert got["kl"][comp == 1].gt(0).all() and got["arca"][comp == 1].gt(0).all()
    assert got["arca_local"][comp == 1].gt(0).all() and got["entropy_drop"].gt(0).any()


def test_arca_local_is_the_per_module_sum_to_1e6():
    model = lora_model()
    ids, attn, comp = batch()
    got = compute_signals(model, ids, attn, comp, names=["arca_local"])["arca_local"]  # (B, L)
    want = manual_lora_norms(model, ids, attn)[:, :-1]  # position j - 1 scores token j
    want = torch.nn.functional.pad(want * comp[:, 1:], (1, 0))
    valid = comp == 1
    rel = ((got[valid].double() - want[valid]).abs() / want[valid]).max()
    assert rel < 1e-6, rel


def test_fresh_lora_arca_local_is_exactly_zero_in_bf16():
    model = lora_model(trained=False).to(torch.bfloat16)
    ids, attn, comp = batch()
    got = compute_signals(model, ids, attn, comp, names=["arca_local", "arca", "kl", "divergence"])
    for name, values in got.items():
        assert (values == 0).all(), name


def test_layer_picks_hidden_state():
    model = lora_model(num_hidden_layers=3)
    ids, attn, comp = batch()
    got = compute_signals(model, ids, attn, comp, layer=1, names=["arca", "kl"])
    want = manual_signals(model, ids, attn, comp, layer=1)
    torch.testing.assert_close(got["arca"], want["arca"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["kl"], want["kl"], atol=1e-5, rtol=1e-5)
    final = compute_signals(model, ids, attn, comp, names=["arca"])["arca"]
    assert not torch.allclose(got["arca"], final)


def test_fresh_lora_has_no_residual():
    model = lora_model(trained=False)
    ids, attn, comp = batch()
    got = compute_signals(model, ids, attn, comp)
    assert (got["arca"] == 0).all() and (got["arca_local"] == 0).all() and (got["divergence"] == 0).all()
    assert got["kl"].abs().max() < 1e-6 and got["entropy_reduction"].abs().max() < 1e-6
    assert got["entropy"][comp == 1].gt(0).all()


def hidden_states_inputs(requires_grad: bool = False):
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 50, bias=True)
    policy = torch.randn(2, 6, 16, requires_grad=requires_grad)
    ref = policy.detach() + 0.3 * torch.randn(2, 6, 16)
    targets = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    return targets, mask, policy, head, ref


def test_states_logits_and_chunking_agree():
    targets, mask, policy, head, ref = hidden_states_inputs(requires_grad=True)
    lora = torch.rand(2, 6)
    with torch.no_grad():  # as the trainer calls it, on hooked states that require grad
        from_hidden = signals_from_states(targets, mask, policy, head, ref, lora_norms=lora, chunk_tokens=1024)
    small = signals_from_states(targets, mask, policy, head, ref, lora_norms=lora, chunk_tokens=3)
    with torch.no_grad():
        from_logits = signals_from_states(
            targets,
            mask,
            None,
            None,
            policy_logits=head(policy),
            ref_logits=head(ref),
            ref_arca_hidden=ref,
            policy_arca_hidden=policy,
            lora_norms=lora,
        )
    for name in SIGNAL_NAMES:
        assert not small[name].requires_grad
        torch.testing.assert_close(small[name], from_hidden[name], atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(from_logits[name], from_hidden[name], atol=1e-5, rtol=1e-5, msg=name)
        assert (from_hidden[name][mask == 0] == 0).all()
    assert from_hidden["kl"][mask == 1].gt(0).all()


def test_all_padding_gives_zeros():
    targets, mask, policy, head, ref = hidden_states_inputs()
    out = signals_from_states(targets, torch.zeros_like(mask), policy, head, ref, lora_norms=torch.ones(2, 6))
    assert all((v == 0).all() and v.shape == (2, 6) for v in out.values())


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"mask": torch.ones(2, 5)}, "mask"),
        ({"ref_hidden": torch.zeros(2, 5, 16)}, "ref_hidden"),
        ({"policy_hidden": torch.zeros(2, 6)}, "policy_hidden"),
        ({"names": ["surprisal", "nope"]}, "names"),
        ({"ref_hidden": None}, "ref_hidden"),
        ({"lm_head": None, "names": ["entropy"]}, "lm_head"),
        ({"policy_hidden": None, "names": ["entropy"]}, "policy_hidden"),
        ({"ref_hidden": None, "ref_logits": torch.zeros(2, 6, 50), "names": ["arca"]}, "ref_hidden"),
        ({"temperature": 0.0}, "temperature"),
        ({"names": ["arca_local"]}, "lora_norms"),
        ({"names": ["arca_local"], "lora_norms": torch.ones(2, 5)}, "lora_norms"),
    ],
)
def test_states_bad_input(kwargs, argument):
    targets, mask, policy, head, ref = hidden_states_inputs()
    args = {"target_ids": targets, "mask": mask, "policy_hidden": policy, "lm_head": head, "ref_hidden": ref}
    with pytest.raises(ValueError, match=argument):
        signals_from_states(**{**args, **kwargs})


def test_compute_bad_input():
    ids, attn, comp = batch()
    with pytest.raises(ValueError, match="model"):
        compute_signals(tiny_model(), ids, attn, comp, names=["arca"])
    policy_only = compute_signals(tiny_model(), ids, attn, comp, names=["surprisal", "uniform"])
    assert (policy_only["uniform"] == comp).all()
    with pytest.raises(ValueError, match="completion_mask"):
        compute_signals(lora_model(), ids, attn, comp[:, 1:])
    with pytest.raises(ValueError, match="layer"):
        compute_signals(lora_model(), ids, attn, comp, layer=7)


def test_registry_accepts_new_signal(monkeypatch):
    monkeypatch.setattr(sig, "SIGNALS", dict(sig.SIGNALS))
    sig.register_signal("confidence", needs_reference=False, needs_logits=True)(lambda stats: stats["logp"].exp())
    assert needs_logits(["confidence"]) and not needs_reference(["confidence", "uniform"])
    targets, mask, policy, head, _ = hidden_states_inputs()
    out = signals_from_states(targets, mask, policy, head, names=["confidence", "surprisal"])
    torch.testing.assert_close(out["confidence"], torch.exp(-out["surprisal"]) * mask)


def _other_family(kind: str):
    """A tiny random model of another family whose forward changes `lm_head(h)`: Gemma-2 softcapping, Cohere scale."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config

    common = {"vocab_size": 128, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2}
    common["num_attention_heads"] = 2
    if kind == "gemma2":  # a small cap so it bends logits of a random model
        config = Gemma2Config(**common, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
        config._attn_implementation = "eager"
    else:
        config = CohereConfig(**common, num_key_value_heads=1, logit_scale=3.0)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_vocab_signals_follow_the_models_own_logits(kind):
    model = _other_family(kind)
    ids, attn, comp = batch()
    got = compute_signals(model, ids, attn, comp, temperature=0.7, chunk_tokens=4)
    want = manual_signals(model, ids, attn, comp, temperature=0.7)  # from the model's returned logits
    for name in ("surprisal", "entropy", "kl", "divergence", "entropy_reduction", "entropy_drop"):
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    naive = signals_from_states(  # the head alone, without the family's output map, is measurably wrong
        ids[:, 1:], comp[:, 1:], *_final_states(model, ids, attn), model.get_output_embeddings(), names=["entropy"]
    )["entropy"]
    assert (naive - got["entropy"][:, 1:]).abs().max() > 1e-3  # 100x the tolerance above


def _final_states(model, ids, attn):
    model.eval()
    with torch.no_grad():
        return (model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1][:, :-1],)
