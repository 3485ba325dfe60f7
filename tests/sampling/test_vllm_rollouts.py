"""vLLM sampling for the dump and evaluate stages (arca.sampling.vllm), with vLLM faked at `LLM.generate`.

The fake engine answers as vLLM does (one `RequestOutput` per prompt, `n` completions of token ids ending at the
first stop id) from the HF model with the requested LoRA: greedy requests are decoded greedily, and the dump test
hands it the completions the HF path sampled. So these tests check everything of ours around the engine (prompt
token ids, sampling params, one LoRA id per snapshot, the `Rollouts` assembly, the signals on the sampled tokens);
real vLLM (kernels, its sampler, LoRA loading) is untested here: no GPU, vLLM not installed.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from arca.sampling.evaluation import evaluate
from arca.sampling.rollouts import generate
from arca.sampling.vllm import VLLMSampler, vllm_lora_rank
from bench.vllm_check import main as vllm_check  # before vLLM is faked: TRL checks the vllm version on import
from tests.tiny import tiny_model, tiny_tokenizer

PROMPTS = [[{"role": "user", "content": "1+1"}], [{"role": "user", "content": "what is 22 + 3?"}]]


class FakeLLM:
    """`vllm.LLM`: `generate` decodes with the HF model in `model` and the request's LoRA, or returns `recorded`."""

    instances: ClassVar[list[FakeLLM]] = []
    recorded: ClassVar[
        dict[tuple[str, tuple[int, ...]], list[list[int]]]
    ] = {}  # (lora path, prompt ids) -> completions

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.calls = kwargs, []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params, lora_request))
        model = AutoModelForCausalLM.from_pretrained(self.kwargs["model"]).eval()
        if lora_request is not None:
            model = PeftModel.from_pretrained(model, lora_request.lora_path).eval()
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            ids = prompt["prompt_token_ids"]
            key = (getattr(lora_request, "lora_path", None), tuple(ids))
            completions = FakeLLM.recorded.get(key) or self._decode(model, ids, params)
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=c) for c in completions]))
        return outputs

    @staticmethod
    @torch.no_grad()
    def _decode(model, ids: list[int], params) -> list[list[int]]:
        """`params.n` completions: greedy at temperature 0, else sampled from `params.seed`."""
        torch.manual_seed(params.seed or 0)
        greedy = params.temperature == 0.0
        out = model.generate(
            torch.tensor([ids]),
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_k=None,
            top_p=None,
            num_return_sequences=params.n,
            max_new_tokens=params.max_tokens,
            eos_token_id=params.stop_token_ids,
            pad_token_id=params.stop_token_ids[0],
        )[:, len(ids) :].tolist()
        ends = [next((i for i, t in enumerate(row) if t in params.stop_token_ids), len(row) - 1) for row in out]
        return [row[: end + 1] for row, end in zip(out, ends)]  # vLLM ends a completion at its first stop id


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    """`vllm` and `vllm.lora.request` in sys.modules (with specs, so `find_spec("vllm")` finds them)."""
    FakeLLM.instances, FakeLLM.recorded = [], {}
    modules = {}
    for name in ("vllm", "vllm.lora", "vllm.lora.request"):
        modules[name] = types.ModuleType(name)
        modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, modules[name])
    modules["vllm"].LLM, modules["vllm"].SamplingParams = FakeLLM, FakeSamplingParams
    modules["vllm.lora.request"].LoRARequest = lambda name, lora_id, path: types.SimpleNamespace(
        lora_name=name, lora_int_id=lora_id, lora_path=path
    )
    return modules


def _ids(tok, messages) -> list[int]:
    """A chat prompt's token ids: the template's text (its special tokens included), nothing added."""
    return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]


def _base_dir(tmp_path: Path) -> Path:
    base = tmp_path / "data/models/base"
    tiny_model().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    return base


def _adapter(path: Path, seed: int) -> Path:
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    model.save_pretrained(path)
    return path


def test_lora_rank_rounds_up_to_one_vllm_serves():
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 32, 64)] == [1, 8, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="rank: vLLM serves LoRA ranks up to 512"):
        vllm_lora_rank(1024)


def test_greedy_rollouts_equal_hf_generate(tmp_path, fake_vllm):
    base, tok = _base_dir(tmp_path), tiny_tokenizer()
    adapter = _adapter(tmp_path / "adapter", seed=1)
    hf_model = PeftModel.from_pretrained(tiny_model(), adapter).eval()
    # batch 1: no padding inside HF's batch, so both paths run the same float computation per prompt
    hf = generate(hf_model, tok, PROMPTS, samples=1, greedy=True, max_new_tokens=9, batch_size=1)
    sampler = VLLMSampler(base, dtype="float32", max_rank=4, seed=7)
    ours = sampler.generate(tok, PROMPTS, adapter_dir=adapter, samples=1, greedy=True, max_new_tokens=9)
    for field in ("input_ids", "attention_mask", "completion_mask", "prompt_index", "sample"):
        assert torch.equal(getattr(ours, field), getattr(hf, field)), field
    assert ours.texts == hf.texts and ours.prompt_length == hf.prompt_length
    (llm,) = FakeLLM.instances
    assert llm.kwargs["enable_lora"] and llm.kwargs["max_lora_rank"] == 8 and llm.kwargs["seed"] == 7
    prompts, params, lora = llm.calls[0]
    assert [p["prompt_token_ids"] for p in prompts] == [_ids(tok, p) for p in PROMPTS]
    assert [(p.n, p.temperature, p.max_tokens, p.stop_token_ids) for p in params] == [(1, 0.0, 9, [3])] * 2
    assert lora.lora_path == str(adapter.resolve())


def test_sampling_params_seeds_and_one_lora_id_per_adapter(tmp_path, fake_vllm):
    base, tok = _base_dir(tmp_path), tiny_tokenizer()
    first, second = _adapter(tmp_path / "a", seed=1), _adapter(tmp_path / "b", seed=2)
    sampler = VLLMSampler(base, max_rank=4)
    completion = [[5, 6, 3]] * 3
    for adapter in (first, second):
        for prompt in PROMPTS:
            ids = _ids(tok, prompt)
            FakeLLM.recorded[(str(adapter.resolve()), tuple(ids))] = completion
    kwargs = {"samples": 3, "max_new_tokens": 5, "greedy": False, "temperature": 0.7, "top_p": 0.95, "top_k": 20}
    out = sampler.generate(tok, PROMPTS, adapter_dir=first, seed=2, **kwargs)
    sampler.generate(tok, PROMPTS, adapter_dir=second, seed=2, **kwargs)
    sampler.generate(tok, PROMPTS, adapter_dir=first, seed=2, **kwargs)
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1] and out.sample.tolist() == [0, 1, 2] * 2
    assert out.completion_mask.sum(1).tolist() == [3] * 6  # up to and including the stop id
    (llm,) = FakeLLM.instances  # one engine, built once
    params = llm.calls[0][1]
    assert [(p.n, p.temperature, p.top_p, p.top_k, p.seed) for p in params] == [
        (3, 0.7, 0.95, 20, 2 * 1_000_003),
        (3, 0.7, 0.95, 20, 2 * 1_000_003 + 1),
    ]
    ids = [call[2].lora_int_id for call in llm.calls]
    assert ids == [1, 2, 1]  # a snapshot keeps its id; another adapter never reuses it


def test_evaluate_with_vllm_equals_hf_on_greedy(tmp_path, fake_vllm):
    base, tok = _base_dir(tmp_path), tiny_tokenizer()
    adapter = _adapter(tmp_path / "adapter", seed=1)
    problems = pd.DataFrame({"prompt_id": ["a", "b"], "eval_set": ["x", "x"], "prompt": PROMPTS, "answer": ["2", "25"]})
    hf_model = PeftModel.from_pretrained(tiny_model(), adapter).eval()
    hf = evaluate(hf_model, tok, problems, k=0, max_new_tokens=9, batch_size=1)
    sampler = VLLMSampler(base, max_rank=4)
    ours = evaluate(
        None, tok, problems, k=0, max_new_tokens=9, sample=partial(sampler.generate, tok, adapter_dir=adapter)
    )
    pd.testing.assert_frame_equal(ours, hf)
    with pytest.raises(ValueError, match="model: required when no `sample` engine is given"):
        evaluate(None, tok, problems, k=0, max_new_tokens=9)


def _dump_workspace(tmp_path: Path, monkeypatch) -> dict:
    """A pipeline workspace with one run of two snapshots, the probe prompts and the base model."""
    monkeypatch.chdir(tmp_path)
    _base_dir(tmp_path)
    run = tmp_path / "data/runs/arca-r4-s0"
    for step, seed in ((0, 1), (2, 2)):
        _adapter(run / "adapters" / f"step-{step:06d}", seed)
    (run / "budget.json").write_text(json.dumps({"method": "arca", "rank": 4, "seed": 0, "params_md5": "x"}))
    (tmp_path / "data/prepared").mkdir(parents=True)
    probe = pd.DataFrame({"prompt_id": ["p-a", "p-b"], "prompt": PROMPTS, "answer": ["2", "25"]})
    probe.to_parquet(tmp_path / "data/prepared/probe.parquet")
    return {
        "model": {"dtype": "float32", "chat_template_kwargs": {}},
        "train": {"max_completion_length": 7, "temperature": 1.0},
        "credit": {"scheme": "mean", "tau": 1.0, "mix": 1.0, "layer": -1, "eps": 1e-8},
        "dump": {"samples": 3, "seed": 0, "batch_size": 4, "engine": "hf"},
    }


def test_dump_signals_do_not_depend_on_the_engine(tmp_path, monkeypatch, fake_vllm):
    """The dump of the HF path, and the dump with vLLM handing back the same completions, are equal row for row,
    weights of every signal included; other completions give another dump (the comparison can fail)."""
    from stages.dump import dump_run

    params = _dump_workspace(tmp_path, monkeypatch)
    meta = {"run": "arca-r4-s0", "method": "arca", "rank": 4, "seed": 0}
    hf = dump_run("arca-r4-s0", meta, params, [], "hf")
    tok = tiny_tokenizer()
    prompt_ids = [tuple(_ids(tok, p)) for p in PROMPTS]
    for step, rows in hf.groupby("step"):
        path = str((tmp_path / f"data/runs/arca-r4-s0/adapters/step-{step:06d}").resolve())
        for i, pid in enumerate(["p-a", "p-b"]):
            mine = rows[rows.prompt_id == pid].sort_values(["sample", "pos"])
            FakeLLM.recorded[(path, prompt_ids[i])] = [g["token_id"].tolist() for _, g in mine.groupby("sample")]
    ours = dump_run("arca-r4-s0", meta, params, [], "vllm")
    pd.testing.assert_frame_equal(ours, hf)
    assert FakeLLM.instances[0].kwargs["dtype"] == "float32"
    for key in FakeLLM.recorded:  # other completions: the rollouts (and so the weights) change
        FakeLLM.recorded[key] = [[5, 6, 3]] * 3
    assert not dump_run("arca-r4-s0", meta, params, [], "vllm").equals(hf)


def test_engine_vllm_without_vllm_fails_naming_the_key(monkeypatch):
    from stages.common import check_engine

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"params.yaml: evaluate.engine: vllm is not installed; pip install"):
        check_engine({"evaluate": {"engine": "vllm"}}, "evaluate")
    with pytest.raises(ValueError, match=r"params.yaml: dump.engine must be one of hf, vllm, got 'sglang'"):
        check_engine({"dump": {"engine": "sglang"}}, "dump")
    assert check_engine({"dump": {}}, "dump") == "hf"


def test_vllm_check_rehearses_both_engines(fake_vllm, capsys):
    vllm_check(["--tiny", "--prompts", "3", "--tokens", "5"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("vllm_check: CPU, tiny Qwen3 bf16 random, r64, 3 prompts x 5 tokens | ")
    assert "greedy identical completions 1.00, shared prefix 1.00" in last  # one model, one float path: equal
    assert last.count("tokens/s: HF ") == 2


def test_vllm_check_says_it_skipped_without_vllm(monkeypatch, capsys):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    vllm_check(["--tiny"])
    assert capsys.readouterr().out.strip() == "vllm_check: skipped, vllm is not installed (pip install '.[vllm]')"
