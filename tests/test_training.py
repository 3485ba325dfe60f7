"""run_training and the train stage on a tiny random Qwen3 (CPU, 4 steps): the files a run leaves, bitwise
determinism, kill-and-resume, and params errors reported before any model loads."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import TrainerCallback

from arca.credit_config import CreditConfig
from arca.run_files import LOG_COLUMNS, read_log, resume_point
from arca.training import TrainSettings, run_fingerprint, run_training
from stages.train import main as train_cli
from tests.tiny import tiny_model, tiny_tokenizer

ADAPTER = "adapter_model.safetensors"


def letter_reward(completions, **kwargs) -> list[float]:
    """Toy reward with a spread inside every group (the random model never boxes an answer)."""
    texts = [c[0]["content"] for c in completions]
    return [sum(ch in string.ascii_lowercase for ch in t) / max(len(t), 1) for t in texts]


def write_prompts(path, n: int = 4) -> None:
    table = pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "prompt": [[{"role": "user", "content": f"question {i}?"}] for i in range(n)],
            "answer": [str(i) for i in range(n)],
            "level": [1] * n,  # extra columns are ignored
        }
    )
    pq.write_table(table, path)


@pytest.fixture
def train_path(tmp_path):
    path = tmp_path / "train.parquet"
    write_prompts(path)
    return path


def settings(tmp_path, train_path, name: str, **overrides) -> TrainSettings:
    """4 prompts, 2 per step: an epoch is 2 steps, so the checkpoint at step 2 resumes into a new epoch."""
    kwargs = {
        "model_dir": tmp_path / "no-model-here",
        "train_path": train_path,
        "output_dir": tmp_path / name,
        "rank": 4,
        "target_modules": ("q_proj", "v_proj"),
        "learning_rate": 1e-2,
        "max_steps": 4,
        "prompts_per_step": 2,
        "num_generations": 4,
        "gradient_accumulation_steps": 2,
        "max_completion_length": 8,
        "save_steps": 2,
    }
    kwargs.update(overrides)
    return TrainSettings(**kwargs)


def run(config: TrainSettings, method: str = "arca", callbacks=()) -> dict:
    return run_training(
        config,
        CreditConfig(method=method),
        tiny_model(),
        tiny_tokenizer(),
        reward_funcs=[letter_reward],
        callbacks=callbacks,
    )


def _nan_as_none(rows: list[dict]) -> list[dict]:
    return [{k: None if v != v else v for k, v in row.items()} for row in rows]  # NaN != NaN (kl at beta 0)


class KillAfterStep(TrainerCallback):
    """Simulate a crash: raise at the start of the step after `step` (step logged, not checkpointed)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated kill")


def test_outputs_determinism_and_resume(tmp_path, train_path):
    full = settings(tmp_path, train_path, "full")
    metrics = run(full)
    out = full.output_dir

    # Files and their contents.
    for step in (0, 2, 4):
        assert (out / "adapters" / f"step-{step:06d}" / ADAPTER).is_file()
    assert not (out / "adapters" / "step-000001").exists()
    start, final = load_file(out / "adapters/step-000000" / ADAPTER), load_file(out / "adapter" / ADAPTER)
    assert all(torch.all(w == 0) for n, w in start.items() if "lora_B" in n)
    assert all(torch.equal(final[n], w) for n, w in load_file(out / "adapters/step-000004" / ADAPTER).items())
    assert any(not torch.equal(final[n], start[n]) for n in start if "lora_B" in n)
    header = (out / "log.tsv").read_text().splitlines()[0].split("\t")
    assert header == list(LOG_COLUMNS)
    rows = read_log(out / "log.tsv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["fallback_rate"] == 1.0 and rows[-1]["fallback_rate"] == 0.0  # ARCA: B = 0 at step 0
    budget = json.loads((out / "budget.json").read_text())
    assert budget["rollouts"] == 2 * 4 * 4 and budget["steps"] == 4
    assert 0 < budget["generated_tokens"] <= budget["rollouts"] * 8
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["steps"] == 4 and metrics["fallback_rate_tail"] == 0.0

    # Killed after step 3 (checkpoint at 2), then resumed: the same adapter bytes, log and budget. Its steps
    # 1-3 rerun from scratch, so this is also the "same settings and seed, same bytes" check. The outputs
    # outside checkpoints/ are wiped first (as DVC does to non-persistent outs): the checkpoint suffices.
    resumed = settings(tmp_path, train_path, "resumed")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(resumed, callbacks=[KillAfterStep(3)])
    assert [r["step"] for r in read_log(resumed.output_dir / "log.tsv")] == [1, 2, 3]
    shutil.rmtree(resumed.output_dir / "adapters")
    (resumed.output_dir / "log.tsv").unlink()
    run(resumed)
    for name in ("adapter", "adapters/step-000000", "adapters/step-000002", "adapters/step-000004"):
        assert (resumed.output_dir / name / ADAPTER).read_bytes() == (out / name / ADAPTER).read_bytes(), name
    assert _nan_as_none(read_log(resumed.output_dir / "log.tsv")) == _nan_as_none(rows)
    resumed_budget = json.loads((resumed.output_dir / "budget.json").read_text())
    assert resumed_budget["generated_tokens"] == budget["generated_tokens"]

    # Rerunning a finished run resumes from its final checkpoint and trains nothing more; with its DVC outputs
    # wiped first, every snapshot comes back (the dumps read the intermediate ones), not just the last.
    shutil.rmtree(resumed.output_dir / "adapters")
    assert run(resumed)["steps"] == 4
    assert (resumed.output_dir / "adapter" / ADAPTER).read_bytes() == (out / "adapter" / ADAPTER).read_bytes()
    for name in ("adapters/step-000000", "adapters/step-000002", "adapters/step-000004"):
        assert (resumed.output_dir / name / ADAPTER).read_bytes() == (out / name / ADAPTER).read_bytes(), name


def test_code_change_starts_over(tmp_path, train_path, monkeypatch):
    """A changed training module means DVC reruns the stage; the old checkpoint must not be resumed."""
    import arca.training as training

    first = settings(tmp_path, train_path, "run", max_steps=2)
    before = run_fingerprint(first, CreditConfig(method="arca"), [letter_reward])
    monkeypatch.setattr(training, "_source_md5", lambda name: "edited" if name == "arca.trainer" else "same")
    after = run_fingerprint(first, CreditConfig(method="arca"), [letter_reward])
    assert before != after and set(after["code"]) == set(training.TRAINING_MODULES)


def test_changed_settings_start_over(tmp_path, train_path):
    first = settings(tmp_path, train_path, "run", max_steps=2)
    run(first)
    assert (first.output_dir / "checkpoints" / "checkpoint-2").is_dir()
    changed = settings(tmp_path, train_path, "run", max_steps=2, learning_rate=5e-3)
    fingerprint = run_fingerprint(changed, CreditConfig(method="arca"), [letter_reward])
    assert resume_point(changed.output_dir, fingerprint) == (None, {}, [])
    assert not (changed.output_dir / "checkpoints").exists() and not (changed.output_dir / "adapters").exists()
    same = run_fingerprint(first, CreditConfig(method="arca"), [letter_reward])
    assert same != fingerprint


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "foo"}, "study.methods: unknown method 'foo'"),
        ({"method": "arca", "tau": 0}, "credit.tau must be > 0, got 0"),
        ({"method": "arca", "mix": 1.5}, r"credit.mix must be in \[0, 1\]"),
        ({"method": "arca", "mix": -0.1}, r"credit.mix must be in \[0, 1\]"),
        ({"method": "arca", "w_max": 0.5}, "credit.w_max must be null or >= 1"),
        ({"method": "arca", "scheme": "max"}, "credit.scheme"),
        ({"method": "arca", "etr_uniform": 0.2, "etr_concentrated": 0.3}, "diagnostics.etr_concentrated"),
    ],
)
def test_credit_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CreditConfig(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rank": 0}, "--rank must be an int > 0, got 0"),
        ({"max_steps": 0}, "params.yaml: train.max_steps must be an int > 0, got 0"),
        ({"num_generations": 1}, "train.num_generations"),
        ({"learning_rate": -1.0}, "train.learning_rate must be > 0"),
        ({"target_modules": ("q_proj", "lm_head")}, "lora.target_modules"),
        ({"gradient_accumulation_steps": 3}, "train.gradient_accumulation_steps must be a divisor of"),
        ({"dtype": "float64"}, "model.dtype"),
    ],
)
def test_train_settings_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        settings(tmp_path, tmp_path / "train.parquet", "run", **overrides)


PARAMS = {
    "model": {"dtype": "float32", "chat_template_kwargs": {}},
    "lora": {"alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "train": {
        "learning_rate": "1e-2",  # YAML reads this as a string
        "max_steps": 1,
        "prompts_per_step": 2,
        "num_generations": 4,
        "max_completion_length": 8,
        "beta": 0.0,
        "temperature": 1.0,
        "loss_type": "dapo",
        "save_steps": 1,
        "logging_steps": 1,
        "gradient_accumulation_steps": 1,
        "use_vllm": False,
    },
    "credit": {"scheme": "mean", "tau": 1.0, "mix": 1.0, "w_max": None, "layer": -1, "eps": "1e-8"},
    "diagnostics": {"etr_uniform": 0.95, "etr_concentrated": 0.25},
}


def _cli(tmp_path, monkeypatch, params: dict, *args: str):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return CliRunner().invoke(train_cli, ["--rank", "4", *args])


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("credit", "tau", 0, "params.yaml: credit.tau must be > 0, got 0"),
        ("credit", "w_max", 0.5, "credit.w_max"),
        ("train", "max_steps", 0, "params.yaml: train.max_steps must be an int > 0, got 0"),
        ("train", "learning_rate", "fast", "params.yaml: train.learning_rate must be a number"),
        ("lora", "alpha", -1, "params.yaml: lora.alpha must be > 0"),
    ],
)
def test_cli_reports_params_errors_before_loading_the_model(tmp_path, monkeypatch, section, key, value, message):
    params = json.loads(json.dumps(PARAMS))
    params[section][key] = value
    result = _cli(tmp_path, monkeypatch, params, "--method", "arca")  # data/models/base does not exist
    assert result.exit_code != 0
    assert message in result.output
    assert "data/models/base" not in result.output


def test_cli_unknown_method_and_missing_model(tmp_path, monkeypatch):
    result = _cli(tmp_path, monkeypatch, PARAMS, "--method", "foo")
    assert result.exit_code != 0 and "study.methods: unknown method 'foo'" in result.output
    result = _cli(tmp_path, monkeypatch, PARAMS, "--method", "arca")
    assert result.exit_code != 0 and "base model directory data/models/base does not exist" in result.output


def test_cli_trains_a_run(tmp_path, monkeypatch):
    (tmp_path / "data/prepared").mkdir(parents=True)
    write_prompts(tmp_path / "data/prepared/train.parquet", n=2)
    tiny_model().save_pretrained(tmp_path / "data/models/base")
    tiny_tokenizer().save_pretrained(tmp_path / "data/models/base")
    result = _cli(tmp_path, monkeypatch, PARAMS, "--method", "kl", "--seed", "3")
    assert result.exit_code == 0, result.output
    out = tmp_path / "data/runs/kl-r4-s3"
    budget = json.loads((out / "budget.json").read_text())
    assert (budget["method"], budget["rank"], budget["seed"], budget["rollouts"]) == ("kl", 4, 3, 8)
    assert (out / "adapter" / ADAPTER).is_file() and (out / "adapters/step-000001" / ADAPTER).is_file()


def test_adapter_config_bytes_do_not_depend_on_hash_seed(tmp_path):
    """target_modules comes out of a set in PEFT; two processes with different hash seeds must write the
    same adapter_config.json."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from peft import LoraConfig, get_peft_model;"
        "from arca.run_files import save_adapter; from tests.tiny import tiny_model;"
        "m = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules='all-linear'));"
        "save_adapter(m, Path(sys.argv[1]))"
    )
    outs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, cwd=Path(__file__).parents[1])
        outs.append((out / "adapter_config.json").read_bytes())
    assert outs[0] == outs[1] == outs[2]
