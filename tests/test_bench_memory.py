"""bench/memory.py: one forked process per measurement, and it resolves a real difference (kl's float32 vocab
sweep on both sides) while two processes of one method agree."""

from __future__ import annotations

from bench.memory import run_one, summary_line, table
from bench.step_overhead import BenchSize

SIZE = BenchSize(vocab=8192, completion_tokens=8, prompt_words=8, warmup_rounds=0, rounds=1)


def test_kl_sweep_shows_in_the_credit_peak_and_repeats_agree():
    uniform = [run_one("uniform", 0.0, SIZE, 1) for _ in range(2)]
    kl = run_one("kl", 0.0, SIZE, 1)
    top = run_one("top_entropy", 0.0, SIZE, 1)
    assert all(r["device"] == "cpu" and r["step_mib"] > 0 and r["process"] > r["step_mib"] for r in [*uniform, kl])
    # kl sweeps both sides: ~3 float32 (64 valid tokens x 8192) tensors per side = 12 MiB; the repeats: < 1 MiB
    assert kl["credit"] - uniform[0]["credit"] > 6
    assert abs(uniform[0]["step_mib"] - uniform[1]["step_mib"]) < 1
    assert abs(uniform[0]["credit"] - uniform[1]["credit"]) < 1
    assert top["credit"] is None  # top_entropy runs no credit code: TRL's own mask


def test_table_and_summary_line():
    def run(step: float, credit: float | None) -> dict:
        return {"step_mib": step, "credit": credit, "generate": 1.0, "rest": step, "process": 500.0, "device": "cpu"}

    results = {
        0.04: {"uniform": [run(100.0, 20.0), run(100.5, 20.0)], "arca": [run(101.0, 21.0), run(102.0, 21.0)]},
        0.0: {"uniform": [run(90.0, 20.0)], "arca": [run(89.96, 20.5)], "top_entropy": [run(90.0, None)]},
    }
    results[0.04]["top_entropy"] = [run(100.0, None)]
    assert summary_line(results) == "peak memory: arca +1.2 MiB over uniform (beta>0), +0.0 MiB (beta=0)"
    rows = table(results).splitlines()
    assert rows[2].startswith("| uniform | 100.2 | +0.0 | 20.0 | +0.0 | 0.5 | 90.0 | +0.0 |")
    assert rows[3].startswith("| arca | 101.5 | +1.2 | 21.0 | +1.0 | 1.0 | 90.0 | +0.0 | 20.5 | +0.5 | - |")
    assert rows[4] == "| top_entropy | 100.0 | -0.2 | - | - | - | 90.0 | +0.0 | - | - | - |"
