"""The params profiles (conf/profile/*.yaml, composed by DVC's Hydra into params.yaml): the paper profile equals
../shared/PAPER.md setting for setting, the study keeps what the paper leaves open, every profile is complete,
params.yaml is the embedded profile as DVC writes it, and the planner counts what the profiles ask for."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

from arca.credit.config import METHOD_FIELDS, METHODS, run_method
from stages.plan import Throughput, plan, snapshot_steps
from stages.plan import main as plan_cli
from stages.profile import DEFAULT_PROFILE, compose, composed_text, profile_names
from stages.profile import main as profile_cli

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("embedded", "paper", "study")

# ../shared/PAPER.md, "Setup", row by row, as the values our params must hold (dotted key -> value). Hard-coded on
# purpose: a change to conf/profile/paper.yaml that leaves the paper's protocol fails here.
PAPER_SETUP: dict[str, dict[str, Any]] = {
    "model: Qwen/Qwen3-1.7B-Base, bfloat16, no gradient checkpointing": {
        "model.profile": "hub",
        "model.hub_id": "Qwen/Qwen3-1.7B-Base",
        "model.dtype": "bfloat16",
        "train.gradient_checkpointing": False,
    },
    "prompt: raw text, no chat template": {
        "prompt.format": "raw",
        "prompt.template": (
            "Solve this math problem step by step. Put your final answer in \\boxed{}.\n\nProblem: {problem}\n"
        ),
        "prompt.system": None,
        "prompt.few_shot": [],
    },
    "train data: the MATH train split, all of it": {
        "data.train.source": "math",
        "data.train.n": None,
        "data.train.levels": None,
        "data.train.subjects": None,
        "data.train.max_answer_chars": None,
    },
    "eval data: the first 200 rows of the MATH test split, not MATH-500": {
        "data.eval.math.split": "test",
        "data.eval.math.n": 200,
        "data.eval.math.select": "first",
        "data.eval.math.levels": None,
        "data.eval.math.subjects": None,
        "data.eval.math.max_answer_chars": None,
    },
    "reward: exact match of the normalized last boxed answer, no math-verify": {"train.grader": "exact"},
    "LoRA: r = 64, alpha = 128, dropout 0.05, q/k/v/o/gate/up/down; ARCA also at r = 4 (alpha 8), 16": {
        "lora.alpha": None,
        "lora.alpha_per_rank": 2,
        "lora.dropout": 0.05,
        "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "optimizer: AdamW, lr 5e-6, weight decay 0, 10 warmup steps then cosine, gradient clip 1.0": {
        "train.learning_rate": 5e-6,
        "train.weight_decay": 0.0,
        "train.warmup_steps": 10,
        "train.lr_scheduler_type": "cosine",
        "train.max_grad_norm": 1.0,
    },
    "batch: 2 prompts x 4 completions per micro-batch, gradient accumulation 4": {
        "train.prompts_per_step": 8,
        "train.num_generations": 4,
        "train.gradient_accumulation_steps": 4,
        "train.num_processes": 1,
    },
    "lengths, sampling: prompt <= 512, <= 512 new tokens, temperature 1.0, top-p 0.95": {
        "train.max_prompt_length": 512,
        "train.max_completion_length": 512,
        "train.temperature": 1.0,
        "train.top_p": 0.95,
        "train.top_k": None,
    },
    "steps, seed: 100 update steps, checkpoints every 20, one seed 1337": {
        "train.max_steps": 100,
        "train.save_steps": 20,
    },
    "loss: on-policy REINFORCE with GRPO advantages, no ratio, clip or KL, one update per batch": {
        "train.loss_type": "grpo",
        "train.beta": 0.0,
    },
    "weights: (a + 1e-8)^2, normalized within the completion; uniform if the sharpened sum is <= 1e-8": {
        "credit.sharpening": 2.0,
        "credit.fallback": "sharpened_sum",
        "credit.eps": 1e-8,
        "credit.scheme": "mean",
        "credit.mix": 1.0,
        "credit.w_max": None,
    },
    "signals: ARCA on hidden_states[-1]; two extra passes of identical shape, adapter on and off": {
        "credit.layer": -1,
        "credit.reference": "matched",
    },
    "mode of the passes: train mode, LoRA dropout active in the ARCA pass": {"credit.salience_dropout": True},
    "evaluation: greedy and pass@4 sampled at the training temperature": {
        "evaluate.k": 4,
        "evaluate.temperature": 1.0,
        "evaluate.top_p": 0.95,
        "evaluate.max_new_tokens": 512,
        "evaluate.primary": "math",
    },
}
# PAPER.md's results table: its seven rows (method, rank), one seed.
PAPER_RUNS = [
    ("uniform", 64),
    ("surprisal", 64),
    ("entropy_drop", 64),  # "entropy reduction": max(H_t - H_t+1, 0) along the completion
    ("divergence", 64),  # "policy divergence": |log pi - log pi_ref| of the sampled token
    ("arca", 4),
    ("arca", 16),
    ("arca", 64),
]
PAPER_TRAINABLE = {4: 4.36e6, 16: 17.4e6, 64: 69.7e6}  # PAPER.md's LoRA row


def value(params: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        params = params[part]
    return params


def key_paths(tree: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf; run ids, eval-set names and template kwargs folded (a profile's own)."""
    if not isinstance(tree, dict):
        return {prefix}
    if prefix in ("study.runs", "data.eval", "model.chat_template_kwargs"):
        return {f"{prefix}.*"}
    return set().union(*(key_paths(v, f"{prefix}.{k}" if prefix else k) for k, v in tree.items()))


@pytest.fixture(scope="module")
def profiles() -> dict[str, dict[str, Any]]:
    return {name: compose(name) for name in PROFILES}


@pytest.mark.parametrize("item", list(PAPER_SETUP))
def test_paper_profile_equals_paper_md(profiles, item):
    paper = profiles["paper"]
    assert {key: value(paper, key) for key in PAPER_SETUP[item]} == PAPER_SETUP[item]


def test_paper_profile_runs_the_paper_table(profiles):
    runs = profiles["paper"]["study"]["runs"]
    assert [(r["method"], r["rank"]) for r in runs.values()] == PAPER_RUNS
    assert {r["seed"] for r in runs.values()} == {1337}
    assert set(profiles["paper"]["data"]["eval"]) == {"math"}  # no set of another profile survives


def test_paper_lora_has_the_papers_trainable_parameters(profiles):
    """alpha_per_rank and the target modules on Qwen3-1.7B's architecture give PAPER.md's counts (meta device)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config

    from arca.run.training import lora_config
    from stages.train import settings_from_params

    config = Qwen3Config.from_json_file(ROOT / "bench" / "qwen3_1_7b_base_config.json")
    for rank, trainable in PAPER_TRAINABLE.items():
        settings, _ = settings_from_params(profiles["paper"], "arca", rank, 1337, Path("unused"))
        assert settings.lora_alpha == 2 * rank
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 1.72  # Qwen3-1.7B, tied embeddings
        peft = get_peft_model(model, lora_config(settings))
        count = sum(p.numel() for p in peft.parameters() if p.requires_grad)
        assert count == pytest.approx(trainable, rel=5e-3), rank


def test_study_profile_keeps_what_the_paper_leaves_open(profiles):
    study = profiles["study"]
    runs = list(study["study"]["runs"].values())
    assert {r["method"] for r in runs} == set(METHODS)  # exact kl / entropy_reduction beside the paper's variants
    cells: dict[tuple[str, int], set[int]] = {}
    for r in runs:
        cells.setdefault((r["method"], r["rank"]), set()).add(r["seed"])
    assert all(len(seeds) >= 3 for seeds in cells.values()), cells
    assert {rank for method, rank in cells if method == "arca"} == {4, 16, 64}
    assert study["data"]["eval"] == {"math": {**study["data"]["eval"]["math"], "split": "math500", "n": None}}
    assert study["credit"]["sharpening"] == 1.0 and study["credit"]["salience_dropout"] is False
    assert study["credit"]["fallback"] == "raw_mean"  # SPEC 3's rule; only the paper profile takes the paper's
    permuted = {(r["method"], r["rank"], r["seed"]) for r in runs if r.get("permute")}
    assert permuted == {("arca", 64, seed) for seed in (0, 1, 2)}  # SPEC 3's permutation control of ARCA
    makefile = (ROOT / "Makefile").read_text()
    assert "-S profile=study -S credit.sharpening=2" in makefile  # the second experiment of `make study`


def test_only_the_paper_profile_falls_back_on_the_sharpened_sum(profiles):
    fallback = {name: profiles[name]["credit"]["fallback"] for name in PROFILES}
    assert fallback == {"embedded": "raw_mean", "paper": "sharpened_sum", "study": "raw_mean"}
    assert all(
        block.get("fallback") == "sharpened_sum" for block in profiles["paper"]["credit"]["methods"].values() if block
    )


def test_every_profile_has_the_same_keys(profiles):
    embedded = key_paths(profiles["embedded"])
    for name in PROFILES:
        assert key_paths(profiles[name]) == embedded, name
        assert profiles[name]["profile"] == name


@pytest.mark.parametrize("name", PROFILES)
def test_run_ids_name_their_cell(profiles, name):
    """dvc.yaml names a stage and its paths by the run id: `<method>[_perm]-r<rank>-s<seed>` of its cell."""
    for run, cell in profiles[name]["study"]["runs"].items():
        assert set(cell) <= {"method", "rank", "seed", "permute"} and cell["method"] in METHODS
        label = run_method(cell["method"], cell.get("permute", False))
        assert run == f"{label}-r{cell['rank']}-s{cell['seed']}"


@pytest.mark.parametrize("name", PROFILES)
def test_a_profile_file_is_its_whole_composition(profiles, name):
    """Complete files: composing adds only the per-method credit blocks and keeps nothing else, so no key of
    another profile leaks into a run; each block is the profile's shared keys a method reads (METHOD_FIELDS)."""
    composed = json.loads(json.dumps(profiles[name]))
    methods = composed["credit"].pop("methods")
    assert composed == yaml.safe_load((ROOT / "conf/profile" / f"{name}.yaml").read_text())
    shared = profiles[name]["credit"]
    assert methods == {m: {k: shared[k] for k in METHOD_FIELDS[m]} for m in METHODS}


def test_credit_methods_conf_mirrors_the_library():
    blocks = yaml.safe_load((ROOT / "conf/credit_methods/default.yaml").read_text())
    assert blocks == {m: {k: f"${{credit.{k}}}" for k in METHOD_FIELDS[m]} for m in METHODS}


def test_a_credit_change_reaches_only_the_methods_that_read_it():
    base, layer = compose("embedded"), compose("embedded", ("credit.layer=-2",))
    changed = {m for m in METHODS if base["credit"]["methods"][m] != layer["credit"]["methods"][m]}
    assert changed == {"arca"}
    sharpened = compose("embedded", ("credit.sharpening=2",))
    changed = {m for m in METHODS if base["credit"]["methods"][m] != sharpened["credit"]["methods"][m]}
    assert changed == set(METHODS) - {"uniform"}


def test_params_yaml_is_the_embedded_profile_as_dvc_writes_it():
    assert profile_names() == sorted(PROFILES) and DEFAULT_PROFILE == "embedded"
    assert (ROOT / "params.yaml").read_text() == composed_text("embedded"), "run `make params`"
    result = CliRunner().invoke(profile_cli, ["--check"])
    assert result.exit_code == 0, result.output


def test_profile_cli_writes_a_composition_and_rejects_unknown_names(tmp_path):
    out = tmp_path / "params.yaml"
    result = CliRunner().invoke(profile_cli, ["paper", "-S", "train.max_steps=2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text())["train"]["max_steps"] == 2
    assert "unknown profile 'papr'" in CliRunner().invoke(profile_cli, ["papr"]).output


def test_dvc_yaml_runs_the_list_of_runs_and_launches_through_the_param():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("train", "dump", "evaluate"):
        assert stages[name]["foreach"] == "${study.runs}" and "matrix" not in stages[name]
    assert re.match(r"\$\{train\.launcher\} -m stages\.train ", stages["train"]["do"]["cmd"])


def test_planner_counts_the_paper_protocol(profiles):
    costs = {c.stage: c for c in plan(profiles["paper"])}
    assert (costs["train"].runs, costs["train"].rollouts, costs["train"].tokens) == (7, 22_400, 22_400 * 512)
    assert snapshot_steps(100, 20) == [0, 20, 40, 60, 80, 100]
    assert costs["dump"].rollouts == 7 * 6 * 16 * 4  # runs x snapshots x probe prompts x samples
    assert costs["evaluate"].rollouts == 8 * 200 * 5  # base + 7 runs; greedy + 4 samples per problem
    assert costs["train"].gpu_hours(Throughput(train=1000.0)) == pytest.approx(22_400 * 512 / 1000 / 3600)


def test_plan_cli_prints_the_active_or_a_named_profile():
    active = CliRunner().invoke(plan_cli, [])
    assert active.exit_code == 0 and active.output.startswith("profile embedded (params.yaml)")
    study = CliRunner().invoke(plan_cli, ["--profile", "study", "--train-tokens-per-s", "2000"])
    assert study.exit_code == 0 and "45 runs" in study.output and "2,000 generated tokens/s" in study.output


def test_planner_counts_the_counterfactual_decodes(profiles):
    """SPEC 9's cost: runs x checkpoints x probe completions x min(max_positions, T) x 2 decodes of <= T tokens."""
    from stages.plan import plan

    paper = profiles["paper"]
    faithful = {c.stage: c for c in plan(paper)}["faithful"]
    completions = paper["data"]["probe"]["n"] * paper["dump"]["samples"]
    positions = min(paper["faithfulness"]["max_positions"], paper["train"]["max_completion_length"])
    assert faithful.rollouts == len(paper["faithfulness"]["runs"]) * completions * positions * 2
    assert faithful.tokens == faithful.rollouts * paper["train"]["max_completion_length"]
