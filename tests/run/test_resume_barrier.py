"""The stale-checkpoint cleanup is fenced by barriers (issue 22, fix 8): process 0 deletes a checkpoint written
under other settings only after every process is done reading it, and no process goes on before it is gone."""

from __future__ import annotations

import torch.distributed as dist

from arca.io import write_json
from arca.run import files as run_files
from arca.run.files import RUN_STATE, distributed_barrier, resume_point


def stale_run(tmp_path):
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    write_json(checkpoint / RUN_STATE, {"fingerprint": {"settings": "old"}})
    (checkpoint / "trainer_state.json").write_text("{}")
    (out / "log.tsv").write_text("step\n")
    return out, checkpoint


def test_cleanup_sits_between_two_barriers(tmp_path, monkeypatch):
    out, checkpoint = stale_run(tmp_path)
    seen: list[bool] = []  # at each barrier: does the stale checkpoint still exist?
    monkeypatch.setenv("RANK", "0")
    assert resume_point(out, {"settings": "new"}, barrier=lambda: seen.append(checkpoint.exists())) == (None, {}, [])
    assert seen == [True, False] and not (out / "log.tsv").exists()


def test_other_ranks_wait_and_delete_nothing(tmp_path, monkeypatch):
    out, checkpoint = stale_run(tmp_path)
    calls: list[int] = []
    monkeypatch.setenv("RANK", "1")
    assert resume_point(out, {"settings": "new"}, barrier=lambda: calls.append(1)) == (None, {}, [])
    assert calls == [1, 1] and checkpoint.is_dir()


def test_a_resumable_run_needs_no_barrier(tmp_path):
    out, checkpoint = stale_run(tmp_path)
    fail = lambda: (_ for _ in ()).throw(AssertionError("no cleanup, no barrier"))  # noqa: E731
    last, state, _ = resume_point(out, {"settings": "old"}, barrier=fail)
    assert last == str(checkpoint) and state["fingerprint"] == {"settings": "old"}


def test_distributed_barrier_uses_the_process_group_when_there_is_one(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    distributed_barrier()
    assert calls == ["barrier"]
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    distributed_barrier()  # one process: nothing to wait for
    assert calls == ["barrier"] and resume_point.__defaults__[-1] is run_files.distributed_barrier
