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

from arca.credit.config import CreditConfig
from arca.run.files import LOG_COLUMNS, read_log, resume_point
from arca.run.training import TrainSettings, drop_long_prompts, grpo_config, load_prompts, run_fingerprint, run_training
from stages.profile import compose
from stages.train import main as train_cli
from stages.train import settings_from_params
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
    # Whole-run means (the paper's columns) over every logged step, beside the tail: step 1 fell back.
    for column in ("gini", "etr", "fallback_rate"):
        assert metrics[f"{column}_mean"] == pytest.approx(sum(r[column] for r in rows) / len(rows))
    assert metrics["fallback_rate_mean"] >= 0.25

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


def test_rerun_of_a_run_finished_mid_epoch_trains_no_step_more(tmp_path, train_path):
    """HF's Trainer checks max_steps only after a step, so resuming a final checkpoint that ends mid-epoch would
    train step max_steps + 1 (the embedded pipeline once recorded 7 of 6 steps): a finished run is restored."""
    first = settings(tmp_path, train_path, "mid", max_steps=3, save_steps=2)  # an epoch is 2 steps
    run(first)
    adapter = (first.output_dir / "adapter" / ADAPTER).read_bytes()
    budget = json.loads((first.output_dir / "budget.json").read_text())
    for name in ("adapters", "adapter"):  # DVC wipes the outputs before it reruns the stage
        shutil.rmtree(first.output_dir / name)
    (first.output_dir / "log.tsv").unlink()
    assert run(first)["steps"] == 3
    assert [r["step"] for r in read_log(first.output_dir / "log.tsv")] == [1, 2, 3]
    assert json.loads((first.output_dir / "budget.json").read_text()) == budget
    assert (first.output_dir / "adapter" / ADAPTER).read_bytes() == adapter
    assert sorted(p.name for p in (first.output_dir / "adapters").iterdir()) == [
        "step-000000",
        "step-000002",
        "step-000003",
    ]


def test_code_change_starts_over(tmp_path, train_path, monkeypatch):
    """A changed module anywhere in the training code's import closure (here `arca.models.base`, which sets the
    dtype, and which the hand-kept list of before left out) means DVC reruns the stage: the old checkpoint must
    not be resumed."""
    from arca.run import fingerprint as fp

    first = settings(tmp_path, train_path, "run", max_steps=2)
    run(first)
    before = run_fingerprint(first, CreditConfig(method="arca"), [letter_reward])
    assert resume_point(first.output_dir, before)[0] is not None  # same code: resumable
    real = fp.source_md5
    monkeypatch.setattr(fp, "source_md5", lambda name: "edited" if name == "arca.models.base" else real(name))
    after = run_fingerprint(first, CreditConfig(method="arca"), [letter_reward])
    assert before != after and set(after["code"]) == set(fp.import_closure())
    assert resume_point(first.output_dir, after) == (None, {}, [])


def test_training_closure_is_computed():
    """The hashed code is what training imports, found from the source: the trainer, the models and the credit
    code are in, the analysis code (never imported by training) and type-checking-only imports are out."""
    from arca.run.fingerprint import import_closure

    closure = import_closure()
    assert {"arca.grpo.trainer", "arca.models.base", "arca.credit.signals", "arca.io", "arca.methods"} <= set(closure)
    assert not [m for m in closure if m.startswith("arca.analysis")]


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
    ("overrides", "message"),
    [
        ({"rank": 0}, "TrainSettings.rank must be an int > 0, got 0"),
        ({"max_steps": 0}, "^TrainSettings.max_steps must be an int > 0, got 0$"),
        ({"num_generations": 1}, "TrainSettings.num_generations"),
        ({"learning_rate": -1.0}, "TrainSettings.learning_rate must be > 0"),
        ({"target_modules": ("q_proj", "lm_head")}, "TrainSettings.target_modules"),
        ({"gradient_accumulation_steps": 3}, "TrainSettings.gradient_accumulation_steps must be a divisor of"),
        ({"dtype": "float64"}, "TrainSettings.dtype"),
        ({"grader": "sympy"}, "TrainSettings.grader must be one of math_verify, exact, got 'sympy'"),
        ({"lr_scheduler_type": "cosine_with_min_lr"}, "TrainSettings.lr_scheduler_type must be one of linear"),
        ({"warmup_steps": -1}, r"TrainSettings.warmup_steps must be an int >= 0 \(optimizer steps\), got -1"),
        ({"warmup_steps": 0.1}, "TrainSettings.warmup_steps must be an int >= 0"),
        ({"max_grad_norm": -1.0}, "TrainSettings.max_grad_norm must be a number >= 0, got -1.0"),
        ({"weight_decay": float("nan")}, "TrainSettings.weight_decay must be a number >= 0"),
        ({"max_prompt_length": 0}, r"TrainSettings.max_prompt_length must be null or an int > 0 \(tokens\), got 0"),
    ],
)
def test_train_settings_errors_name_the_field_not_a_params_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        settings(tmp_path, tmp_path / "train.parquet", "run", **overrides)


def _tiny_params() -> dict:
    """A whole params file (the embedded profile, which the train stage validates first) with a tiny run's
    training, LoRA and credit values."""
    params = compose("embedded")
    params["model"].update({"dtype": "float32", "chat_template_kwargs": {}})
    params["lora"].update({"alpha": 8, "alpha_per_rank": None, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    params["train"].update(
        {
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
            "device": "cpu",
        }
    )
    methods = params["credit"]["methods"]
    methods["arca"] = {"scheme": "mean", "tau": 1.0, "mix": 1.0, "w_max": None, "layer": -1, "eps": "1e-8"}
    methods["kl"] = {"scheme": "mean", "eps": "1e-8", "reference": "matched"}
    return params


PARAMS = _tiny_params()


def _cli(tmp_path, monkeypatch, params: dict, *args: str):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return CliRunner().invoke(train_cli, ["--rank", "4", *args])


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("credit", "tau", 0, "params.yaml: `credit.methods.arca.tau`: Input should be greater than 0, got 0"),
        ("credit", "w_max", 0.5, "params.yaml: `credit.methods.arca.w_max`: Input should be greater than or equal"),
        ("credit", "layer", 99, "params.yaml: `credit.methods.arca.layer`: must be in [-3, 2]"),
        ("credit", "top_entropy_quantile", 0.5, "params.yaml: credit.methods.arca.top_entropy_quantile: arca does not"),
        ("train", "max_steps", 0, "params.yaml: `train.max_steps`: Input should be greater than 0, got 0"),
        ("train", "learning_rate", "fast", "params.yaml: `train.learning_rate`: Input should be a valid number"),
        ("lora", "alpha", -1, "params.yaml: `lora.alpha`: Input should be greater than 0, got -1"),
    ],
)
def test_cli_reports_params_errors_before_loading_the_model(tmp_path, monkeypatch, section, key, value, message):
    params = json.loads(json.dumps(PARAMS))
    (params["credit"]["methods"]["arca"] if section == "credit" else params[section])[key] = value
    base = tmp_path / "data/models/base"  # only its config: the layer check reads it, the model never loads
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/train.parquet").write_text("")
    result = _cli(tmp_path, monkeypatch, params, "--method", "arca")
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_unknown_method_and_missing_model(tmp_path, monkeypatch):
    result = _cli(tmp_path, monkeypatch, PARAMS, "--method", "foo")
    assert result.exit_code != 0 and "params.yaml: study.runs.<run>.method: must be one of uniform" in result.output
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
        "from arca.run.files import save_adapter; from tests.tiny import tiny_model;"
        "m = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules='all-linear'));"
        "save_adapter(m, Path(sys.argv[1]))"
    )
    outs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, cwd=Path(__file__).parents[2])
        outs.append((out / "adapter_config.json").read_bytes())
    assert outs[0] == outs[1] == outs[2]


# ---- the paper's protocol knobs: schedule, clipping, decay, grader, prompt length ---------------------------


def test_defaults_are_hf_and_trl_defaults(tmp_path, train_path):
    """Leaving the new keys out trains as before: the GRPOConfig equals TRL's own defaults for them."""
    config = grpo_config(settings(tmp_path, train_path, "run"), CreditConfig(method="uniform"))
    assert str(config.lr_scheduler_type.value) == "linear" and config.warmup_steps == 0
    assert (config.max_grad_norm, config.weight_decay) == (1.0, 0.0)
    paper = settings(
        tmp_path,
        train_path,
        "paper",
        lr_scheduler_type="cosine",
        warmup_steps=10,
        max_grad_norm=1.0,
        weight_decay=0.0,
        grader="exact",
    )
    config = grpo_config(paper, CreditConfig(method="uniform"))
    assert str(config.lr_scheduler_type.value) == "cosine" and config.warmup_steps == 10


def test_arca_report_to_reaches_trl_and_no_fingerprint(tmp_path, train_path, monkeypatch):
    """A tracker watches: ARCA_REPORT_TO sets TRL's report_to and leaves the run's fingerprint and params hash
    (what resume and budget.json's params_md5 compare) as they were."""
    from transformers.integrations import get_available_reporting_integrations

    from arca.run.training import settings_md5

    if "tensorboard" not in get_available_reporting_integrations():
        pytest.skip("no TensorBoard writer installed (tensorboardX is a test dependency: make setup)")
    run, credit = settings(tmp_path, train_path, "run"), CreditConfig(method="arca")
    monkeypatch.delenv("ARCA_REPORT_TO", raising=False)
    off = grpo_config(run, credit), run_fingerprint(run, credit, [letter_reward])
    monkeypatch.setenv("ARCA_REPORT_TO", "tensorboard")
    on = grpo_config(run, credit), run_fingerprint(run, credit, [letter_reward])
    assert (off[0].report_to, on[0].report_to) == ([], ["tensorboard"])
    assert on[1] == off[1] and settings_md5(on[1]) == settings_md5(off[1])
    monkeypatch.setenv("ARCA_REPORT_TO", "tensorbord")
    with pytest.raises(ValueError, match="ARCA_REPORT_TO='tensorbord': unknown tracker"):
        run_training(run, credit, reward_funcs=[letter_reward])  # before any model loads: model_dir is missing


def write_raw_prompts(path: Path, lengths: list[int]) -> None:
    """Raw-text prompts (prompt.format: raw) of the given lengths in characters (= tokens of the tiny tokenizer)."""
    texts = [("Q" * (n - 1)) + "\n" for n in lengths]
    table = pa.table({"prompt_id": [f"p{i}" for i in range(len(texts))], "prompt": texts, "answer": ["1"] * len(texts)})
    pq.write_table(table, path)


def test_drop_long_prompts_counts_tokens_as_trl_does(tmp_path):
    path = tmp_path / "train.parquet"
    write_raw_prompts(path, [5, 9, 12, 9])
    dataset = load_prompts(path)
    kept, dropped = drop_long_prompts(dataset, tiny_tokenizer(), 9)
    assert dropped == 1 and kept["prompt_id"] == ["p0", "p1", "p3"]
    assert drop_long_prompts(dataset, tiny_tokenizer(), None) == (dataset, 0)
    with pytest.raises(ValueError, match=r"train.max_prompt_length = 4 tokens drops every training prompt"):
        drop_long_prompts(dataset, tiny_tokenizer(), 4)
    chat = tmp_path / "chat.parquet"
    write_prompts(chat, n=2)  # `<|im_start|>user\nquestion 0?<|im_end|>\n<|im_start|>assistant\n`: 30 tokens
    with pytest.raises(ValueError, match="the shortest has 30"):
        drop_long_prompts(load_prompts(chat), tiny_tokenizer(), 29)
    assert drop_long_prompts(load_prompts(chat), tiny_tokenizer(), 30)[1] == 0


class RecordLearningRates(TrainerCallback):
    """The learning rate each optimizer update applies, read from the optimizer right before it steps."""

    def __init__(self):
        self.applied: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.applied.append(optimizer.param_groups[0]["lr"])


def test_paper_schedule_exact_grader_and_raw_prompts(tmp_path):
    """Warmup + cosine as the paper's `get_cosine_schedule_with_warmup` (lr 0 at the first update), the reward
    `train.grader` names, raw-text prompts, and the prompt-length filter recorded in budget.json."""
    path = tmp_path / "train.parquet"
    write_raw_prompts(path, [6, 7, 8, 40])
    run_settings = settings(
        tmp_path,
        path,
        "paper",
        max_steps=3,
        save_steps=3,
        learning_rate=0.1,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        grader="exact",
        max_prompt_length=10,
    )
    lrs = RecordLearningRates()
    run_training(run_settings, CreditConfig(method="uniform"), tiny_model(), tiny_tokenizer(), callbacks=[lrs])
    assert lrs.applied == pytest.approx([0.0, 0.1, 0.05])  # lambda(0) = 0/1; cosine over steps 1..3
    budget = json.loads((run_settings.output_dir / "budget.json").read_text())
    assert budget["prompts_too_long"] == 1
    fingerprint = run_fingerprint(run_settings, CreditConfig(method="uniform"), [])
    assert fingerprint["settings"]["grader"] == "exact"
    state = json.loads(next((run_settings.output_dir / "checkpoints").glob("checkpoint-*/run_state.json")).read_text())
    assert "arca.grading.exact_accuracy_reward" in json.dumps(state)  # the stable id (arca.run.fingerprint)


def test_stage_reads_the_paper_keys(tmp_path):
    params = json.loads(json.dumps(PARAMS))
    params["train"].update(
        {
            "grader": "exact",
            "lr_scheduler_type": "cosine",
            "warmup_steps": 10,
            "max_grad_norm": "1e0",  # YAML strings are numbers here too
            "weight_decay": 0,
            "max_prompt_length": 512,
            "num_processes": 1,
            "launcher": "python",
        }
    )
    run_settings, _ = settings_from_params(params, "uniform", 64, 1337, tmp_path / "run")
    assert (run_settings.grader, run_settings.lr_scheduler_type, run_settings.warmup_steps) == ("exact", "cosine", 10)
    assert (run_settings.max_grad_norm, run_settings.weight_decay, run_settings.max_prompt_length) == (1.0, 0, 512)
    default, _ = settings_from_params(PARAMS, "uniform", 64, 1337, tmp_path / "run")
    assert (default.grader, default.lr_scheduler_type, default.warmup_steps) == ("math_verify", "linear", 0)


def test_cli_names_a_bad_grader_before_loading_the_model(tmp_path, monkeypatch):
    params = json.loads(json.dumps(PARAMS))
    params["train"]["grader"] = "math-verify"
    result = _cli(tmp_path, monkeypatch, params, "--method", "uniform")
    assert result.exit_code != 0 and "`train.grader`: Input should be 'math_verify' or 'exact'" in result.output
    assert "Traceback" not in result.output


def test_alpha_per_rank_scales_with_the_rank(tmp_path):
    """The paper's alpha = 2r over ranks 4, 16, 64 from one params file."""
    params = json.loads(json.dumps(PARAMS))
    params["lora"] = {**params["lora"], "alpha": None, "alpha_per_rank": 2}
    alphas = [settings_from_params(params, "arca", r, 1337, tmp_path / "run")[0].lora_alpha for r in (4, 16, 64)]
    assert alphas == [8.0, 32.0, 128.0]
    with pytest.raises(ValueError, match=r"set exactly one of lora\.alpha and lora\.alpha_per_rank"):
        settings_from_params({**params, "lora": {**params["lora"], "alpha": 8}}, "arca", 4, 0, tmp_path / "run")
    with pytest.raises(ValueError, match=r"`lora\.alpha_per_rank`: Input should be greater than 0, got 0"):
        settings_from_params({**params, "lora": {**params["lora"], "alpha_per_rank": 0}}, "arca", 4, 0, tmp_path)
