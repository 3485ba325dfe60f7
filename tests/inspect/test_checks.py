"""`arca inspect`'s input checks, before any model loads: the prompts file (line numbers named), the adapter
(PEFT LoRA only) and whether it fits the base (module names and shapes from safetensors headers)."""

from __future__ import annotations

import json

import pytest
import yaml

from arca.inspect.checks import InputError, check_adapter, check_adapter_fits, read_prompts, resolve_base
from arca.inspect.report import FORMATTING_TOKENS, adapter_step, use_chat
from tests.inspect.saved import ROOT, save_adapter, save_base
from tests.tiny import tiny_tokenizer


def test_prompts_file_reads_problems_answers_and_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    system = [{"role": "system", "content": "Box it."}, {"role": "user", "content": "x?"}]
    lines = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": 4, "id": "four"}]
    lines.append({"problem": "x?", "messages": system})
    path.write_text("\n".join(json.dumps(r) for r in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    frame = read_prompts(path)
    assert frame["prompt_id"].tolist() == ["line-00001", "four", "line-00004"]  # blank line 3 skipped, still counted
    assert frame["answer"].tolist() == ["2", "4", None]
    assert frame["messages"].tolist() == [None, None, system]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"no prompts \(the file is empty\)"),
        ("\n  \n", r"no prompts \(the file is empty\)"),
        ('{"problem": "1+1"}\n{"problem": "2+2",\n', r"line 2: not valid JSON"),
        ('["1+1"]\n', r"line 1: a JSON object with `problem` expected, got list"),
        ('{"problem": "a"}\n{"question": "1+1"}\n', r"line 2: `problem` must be a non-empty string, got None"),
        ('{"problem": "1+1", "answer": [2]}\n', r"line 1: `answer` must be a string or a number"),
        ('{"problem": "a", "id": "x"}\n{"problem": "b", "id": "x"}\n', r"`id` 'x' is used twice"),
        ('{"problem": "a", "messages": [{"role": "user"}]}\n', r"line 1: `messages` must be a non-empty list of"),
    ],
)
def test_bad_prompts_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_prompts(path)
    with pytest.raises(InputError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_adapter_must_be_a_peft_lora_directory(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        check_adapter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"not a PEFT adapter, it has no adapter_config\.json"):
        check_adapter(tmp_path / "empty")
    adapter = save_adapter(tmp_path / "lora")
    assert check_adapter(adapter).rank == 4
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(InputError, match="peft_type is 'PREFIX_TUNING', not 'LORA'"):
        check_adapter(adapter)


@pytest.mark.parametrize(
    "other, message",
    [
        (
            {"num_hidden_layers": 3},
            r"7 of its 21 adapted modules are not in the base, e\.g\. model\.layers\.2\.mlp\.down_proj",
        ),
        (
            {"hidden_size": 48},
            r"14 LoRA shapes differ, e\.g\. \S+down_proj\.lora_B\.weight is \[48, 4\] "
            r"but base's \S+down_proj.weight is \[32, 64\]",
        ),
    ],
)
def test_adapter_of_another_base_is_refused(tmp_path, other, message):
    base = resolve_base(str(save_base(tmp_path / "base")))
    assert check_adapter_fits(check_adapter(save_adapter(tmp_path / "fits")), "base", base.shapes) == 14
    with pytest.raises(InputError, match=message):
        check_adapter_fits(check_adapter(save_adapter(tmp_path / "other", **other)), "base", base.shapes)


def test_base_must_be_a_model_directory_or_a_cached_hub_id(tmp_path, monkeypatch):
    from huggingface_hub import constants

    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(InputError, match=r"has no config\.json"):
        resolve_base(str(tmp_path / "not-a-model"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(InputError, match=r"not in the hub cache .* HF_HUB_OFFLINE=1 forbids a download"):
        resolve_base("arca-test/never-downloaded")


def test_chat_template_or_raw_text():
    tok = tiny_tokenizer()
    assert use_chat(tok, None) and use_chat(tok, "chat") and not use_chat(tok, "raw")
    tok.chat_template = None
    assert not use_chat(tok, None)
    with pytest.raises(ValueError, match="--format chat: the tokenizer has no chat template; use --format raw"):
        use_chat(tok, "chat")


def test_adapter_step_from_its_directory(tmp_path):
    for name, step in (("checkpoint-500", 500), ("step-000004", 4), ("final", 0)):
        (tmp_path / name).mkdir()
        assert adapter_step(tmp_path / name) == step
    (tmp_path / "final" / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    assert adapter_step(tmp_path / "final") == 12


def test_formatting_tokens_are_the_embedded_profiles():
    profile = yaml.safe_load((ROOT / "conf/profile/embedded.yaml").read_text())
    assert FORMATTING_TOKENS == profile["diagnostics"]["formatting_tokens"]
