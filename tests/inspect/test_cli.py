"""`arca inspect` end to end on a tiny base and a PEFT-saved adapter: with and without answers, through the
installed console script on a hub-cache snapshot with HF_HUB_OFFLINE=1, bad inputs refused before any model
loads, and its tokens.parquet equal to the dump stage's on the same completions (every signal's a_ and w_)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from arca.credit.signals import SIGNAL_NAMES
from arca.inspect.cli import main
from arca.io import write_parquet
from arca.sampling.dump import dump_schema
from arca.tasks.grading import GRADERS
from tests.inspect.saved import save_adapter, save_base
from tests.stages.test_gpu_profiles import save_hub_snapshot

PROBLEMS = [{"problem": "1+1", "answer": "2"}, {"problem": "what is 22 + 3?", "answer": "25"}]
SMALL = ["--samples", "3", "--max-new-tokens", "7", "--batch-size", "4", "--max-positions", "3", "--dtype", "float32"]


def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def inspect(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["inspect", *args])
    return result.exit_code, result.output + (str(result.exception) if result.exit_code not in (0, 1) else "")


@pytest.fixture
def inputs(tmp_path) -> dict[str, str]:
    return {
        "--base": str(save_base(tmp_path / "base")),
        "--adapter": str(save_adapter(tmp_path / "checkpoint-8")),
        "--prompts": str(write_prompts(tmp_path / "prompts.jsonl", PROBLEMS)),
        "--out": str(tmp_path / "out"),
    }


def flat(options: dict[str, str]) -> list[str]:
    return [x for kv in options.items() for x in kv]


def test_console_script_is_declared_and_resolves():
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="arca")
    assert entry.value == "arca.inspect.cli:main" and entry.load() is main
    assert (Path(sys.executable).parent / "arca").is_file()  # `pip install .` put it beside the interpreter


def test_inspect_with_answers_writes_all_four_outputs(inputs, monkeypatch, caplog):
    """A grader that rewards an even-length completion: interventions flip it, so SPEC 9 has decisive tokens
    and counted completions, and `uniform` must sit at auc 0.5 exactly."""
    monkeypatch.setitem(GRADERS, "math_verify", lambda text, answer: float(len(text) % 2 == 0))
    caplog.set_level("INFO")
    code, output = inspect(*flat(inputs), *SMALL)
    assert code == 0, output
    out = Path(inputs["--out"])
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert pq.read_schema(out / "tokens.parquet").names == dump_schema(SIGNAL_NAMES).names  # float32: no a32_
    assert set(tokens["run"]) == {"checkpoint-8"} and set(tokens["step"]) == {8} and set(tokens["rank"]) == {4}
    assert tokens["reward"].notna().all() and tokens.groupby(["prompt_id", "sample"]).ngroups == 6
    concentration = (out / "concentration.md").read_text()
    assert all(f"| {s} | 4 |" in concentration for s in SIGNAL_NAMES)
    effects = pd.read_parquet(out / "effects.parquet")
    assert effects["decisive"].any() and not effects["decisive"].all()
    faithfulness = (out / "faithfulness.md").read_text()
    assert "| uniform | checkpoint-8 | 8 | 0.500 [0.500, 0.500] | 1.000 [1.000, 1.000] |" in faithfulness
    page = (out / "explorer.html").read_text()
    assert "checkpoint-8" in page and "what is 22 + 3?" in page
    lines = [r.getMessage() for r in caplog.records if r.name == "arca.progress"]
    for phase in ("sampling", "signals", "counterfactual decodes"):  # plain lines off a terminal, with an ETA
        assert any(line.startswith(f"inspect: {phase}: ") and "ETA" in line for line in lines), phase
    assert not any("\r" in line for line in lines)


def test_inspect_without_answers_skips_rewards_and_faithfulness(inputs, tmp_path):
    write_prompts(Path(inputs["--prompts"]), [{"problem": p["problem"]} for p in PROBLEMS])
    Path(inputs["--out"]).mkdir()
    (Path(inputs["--out"]) / "faithfulness.md").write_text("an earlier inspection's")  # must not survive
    code, output = inspect(*flat(inputs), *SMALL, "--run", "mine")
    assert code == 0, output
    out = Path(inputs["--out"])
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert set(tokens["run"]) == {"mine"} and tokens["reward"].isna().all() and tokens["advantage"].isna().all()
    assert tokens["w_arca"].notna().all() and (out / "concentration.md").is_file() and (out / "explorer.html").is_file()
    assert not (out / "faithfulness.md").exists() and not (out / "effects.parquet").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--adapter": "nowhere"}, "--adapter nowhere: no such directory"),
        ({"--prompts": "empty.jsonl"}, "no prompts (the file is empty)"),
        ({"--prompts": "bad.jsonl"}, "bad.jsonl line 2: not valid JSON"),
        ({"--adapter": "wide"}, "does not fit --base"),
        ({"--adapter": "prefix"}, "peft_type is 'PREFIX_TUNING', not 'LORA'"),
        ({"--format": "chat", "--base": "no-template"}, "--format chat: the tokenizer has no chat template"),
        ({"--format": "raw", "--prompts": "chat.jsonl"}, "--prompts: line-00001 has `messages`, a chat prompt"),
    ],
)
def test_bad_inputs_fail_before_any_model_loads(inputs, tmp_path, monkeypatch, change, message):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(PeftModel, "from_pretrained", refuse)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"problem": "1+1"}\n{"problem": \n')
    write_prompts(tmp_path / "chat.jsonl", [{"problem": "1+1", "messages": [{"role": "user", "content": "1+1"}]}])
    save_adapter(tmp_path / "wide", hidden_size=48)
    prefix = save_adapter(tmp_path / "prefix")
    config = json.loads((prefix / "adapter_config.json").read_text())
    (prefix / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    untemplated = save_base(tmp_path / "no-template")
    tokenizer_config = json.loads((untemplated / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (untemplated / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (untemplated / "chat_template.jinja").unlink(missing_ok=True)
    monkeypatch.chdir(tmp_path)
    code, output = inspect(*flat({**inputs, **change}))
    assert code == 1 and message in output and "Traceback" not in output, output
    assert not Path(inputs["--out"]).exists()


def test_tokens_equal_the_dump_stage_on_the_same_completions(tmp_path, monkeypatch):
    """The dump stage on a pipeline workspace (one run, snapshots at steps 0 and 2) and `arca inspect` on each
    snapshot with the same sampling: the same rows, rewards, advantages and every signal's a_ and w_; only the
    columns a bare adapter cannot know (run, method, training seed) differ. Another snapshot gives other rows."""
    from stages.dump import dump_run
    from tests.sampling.test_vllm_rollouts import _dump_workspace

    params = _dump_workspace(tmp_path, monkeypatch)
    dump = dump_run("arca-r4-s0", {"run": "arca-r4-s0", "method": "arca", "rank": 4, "seed": 0}, params, [], "hf")
    write_parquet("data/dumps/arca-r4-s0.parquet", dump, schema=dump_schema(SIGNAL_NAMES))  # as the stage writes it
    dump = pd.read_parquet("data/dumps/arca-r4-s0.parquet")
    probe = pd.read_parquet("data/prepared/probe.parquet")
    rows = [
        {"problem": p[0]["content"], "answer": a, "id": i}
        for i, p, a in probe[["prompt_id", "prompt", "answer"]].values
    ]
    rows[0]["messages"] = [dict(m) for m in probe["prompt"].iat[0]]  # the whole chat prompt, as prepare writes it
    write_prompts(tmp_path / "probe.jsonl", rows)
    ours = {}
    for step in (0, 2):
        adapter = f"data/runs/arca-r4-s0/adapters/step-{step:06d}"
        args = ["--base", "data/models/base", "--adapter", adapter, "--prompts", "probe.jsonl", "--out", f"out{step}"]
        code, output = inspect(*args, *SMALL[:6], "--seed", "0", "--dtype", "float32", "--no-faithfulness")
        assert code == 0, output
        ours[step] = pd.read_parquet(f"out{step}/tokens.parquet").drop(columns=["run", "method", "seed"])
    assert sorted(c for c in ours[2].columns if c.startswith("w_")) == sorted(f"w_{s}" for s in SIGNAL_NAMES)
    for step, frame in ours.items():
        expected = dump[dump["step"] == step].drop(columns=["run", "method", "seed"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(frame, expected)
    assert not ours[0][["token_id", "w_arca"]].equals(ours[2][["token_id", "w_arca"]])


def test_installed_script_on_a_hub_snapshot_offline(tmp_path):
    """`arca inspect --base <hub id>` with HF_HUB_OFFLINE=1 and the model only in the hub cache, run as a user runs
    it: the console script `pip install .` installed."""
    hub = tmp_path / "hf"
    save_hub_snapshot(hub / "hub", "arca-test/tiny-qwen3")
    adapter = save_adapter(tmp_path / "adapter")
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROBLEMS)
    env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_CACHE": str(hub / "hub"), "HF_HUB_OFFLINE": "1"}
    env |= {"TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = str(Path(sys.executable).parent / "arca")
    args = ["inspect", "--base", "arca-test/tiny-qwen3", "--adapter", str(adapter), "--prompts", str(prompts)]
    done = subprocess.run(
        [script, *args, "--out", str(tmp_path / "out"), *SMALL], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"tokens.parquet", "concentration.md", "effects.parquet",
                                               "faithfulness.md", "explorer.html"}  # fmt: skip
    assert pq.read_schema(out / "tokens.parquet").metadata[b"arca.base"] == b"arca-test/tiny-qwen3"
    assert "inspect: sampling: " in done.stderr and "\r" not in done.stderr  # a pipe: plain lines, no bar
