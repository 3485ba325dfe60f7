"""The train stage under `accelerate launch` with 2 CPU processes (gloo): one step, both ranks end with the same
adapter, and a stage started with the wrong process count fails at once instead of relaunching itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from stages.train import main as train_cli
from tests.run.test_training import PARAMS, write_prompts
from tests.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]

# Each rank records its LoRA weights' hash and the process group it trained in, around the real stage CLI's code path.
DRIVER = """
import hashlib, json, os
import arca.run.training as training
original = training.CreditGRPOTrainer.train
def train(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    lora = {n: p.detach().cpu() for n, p in self.model.named_parameters() if "lora_" in n}
    digest = hashlib.md5(b"".join(lora[n].numpy().tobytes() for n in sorted(lora))).hexdigest()
    seen = {"md5": digest, "process_index": self.args.process_index, "processes": self.accelerator.num_processes}
    open(f"rank{os.environ['RANK']}.json", "w").write(json.dumps(seen))
    return out
training.CreditGRPOTrainer.train = train
from stages.train import main
main()
"""


def _workspace(tmp_path: Path, num_processes: int) -> None:
    (tmp_path / "data/prepared").mkdir(parents=True)
    write_prompts(tmp_path / "data/prepared/train.parquet", n=2)
    tiny_model().save_pretrained(tmp_path / "data/models/base")
    tiny_tokenizer().save_pretrained(tmp_path / "data/models/base")
    params = json.loads(json.dumps(PARAMS))
    params["train"]["num_processes"] = num_processes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def test_two_gloo_processes_train_one_step_and_agree(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    _workspace(tmp_path, num_processes=2)
    (tmp_path / "driver.py").write_text(DRIVER)
    # --multi_gpu is torchrun under the hood; with no GPU each process takes the gloo backend (`--cpu` alone
    # would start a single process: its multi-CPU path needs mpirun).
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
    ]
    cmd += ["--dynamo_backend", "no", "driver.py", "--method", "arca", "--rank", "4", "--seed", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # One DDP run over gloo, not two single-process runs that happen to agree (Accelerate needs `use_cpu` for that)
    assert [(r["process_index"], r["processes"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["md5"] == ranks[1]["md5"]
    budget = json.loads((tmp_path / "data/runs/arca-r4-s0/budget.json").read_text())
    assert budget["steps"] == 1 and budget["rollouts"] == 8  # 2 prompts x 4 completions, split over 2 ranks


def test_wrong_process_count_fails_without_relaunching(tmp_path, monkeypatch):
    _workspace(tmp_path, num_processes=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(train_cli, ["--method", "arca", "--rank", "4"])
    assert result.exit_code != 0
    assert "train.num_processes is 2 but this stage runs in 1 process(es)" in result.output
    assert "accelerate launch --num_processes 2" in result.output
