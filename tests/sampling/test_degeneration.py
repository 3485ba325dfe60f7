"""The degeneration map (SPEC 10): saliences under pi_c on fixed tokens, SPEC 10's prediction, the stage and the
table / figure on a tiny setup, float32 and bf16."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from arca.analysis.degeneration_report import degeneration_figure, degeneration_table
from arca.credit.config import CreditConfig
from arca.credit.diagnostics import gini
from arca.credit.signals import SIGNAL_NAMES
from arca.sampling.degeneration import rollouts_from_dump, scaled_saliences, token_frame
from arca.sampling.dump import normalized, raw_saliences, token_table
from arca.sampling.rollouts import generate
from arca.sampling.scaling import scaled_adapter
from tests.sampling.test_scaling import lora_model
from tests.sampling.test_vllm_rollouts import PROMPTS, _dump_workspace
from tests.tiny import tiny_tokenizer

SCALES = [0.0, 0.01, 0.1, 1.0]


def _rollouts(model, samples: int = 4, tokens: int = 16):
    return generate(model, tiny_tokenizer(), PROMPTS, samples=samples, max_new_tokens=tokens, greedy=False, seed=0)


def test_scale_one_equals_compute_signals_and_zero_the_reference():
    model = lora_model(scale=0.3)
    rollouts = _rollouts(model, samples=2)
    ours = scaled_saliences(model, rollouts, SCALES, SIGNAL_NAMES, batch_size=3)
    theirs = raw_saliences(model, rollouts, SIGNAL_NAMES, batch_size=3)
    for name in SIGNAL_NAMES:
        assert torch.equal(ours[1.0][name], theirs[name]), name
    with scaled_adapter(model, 0.0):  # c = 0 reuses the reference pass: the same as a pass at c = 0
        zero = raw_saliences(model, rollouts, SIGNAL_NAMES, batch_size=3)
    for name in SIGNAL_NAMES:
        assert torch.equal(ours[0.0][name], zero[name]), name
    for name in ("arca", "kl", "entropy_reduction", "divergence", "arca_local"):
        assert torch.equal(ours[0.0][name], torch.zeros_like(ours[0.0][name])), name
    assert ours[0.01]["kl"].sum() > 0


def test_gini_of_arca_and_kl_does_not_move_at_small_scales():
    """SPEC 10: a salience proportional to a power of c has c-free weights. A float32 tiny adapter (B random,
    KL ~1e-5 to 1e-3 between c = 0.01 and 0.1) keeps the Gini of arca and kl within 0.01; c = 1 (KL several times
    larger, out of the linear regime) moves them, so the comparison can fail."""
    model = lora_model(scale=0.3)
    rollouts = _rollouts(model)
    mask = rollouts.completion_mask[:, rollouts.prompt_length :]
    raw = scaled_saliences(model, rollouts, [0.01, 0.1, 1.0], ["arca", "kl"], batch_size=8)
    credit = CreditConfig(method="arca")
    g = {c: {n: gini(w, mask).mean() for n, (_, w) in normalized(raw[c], rollouts, credit).items()} for c in raw}
    for name in ("arca", "kl"):
        assert abs(g[0.01][name] - g[0.1][name]) < 0.01, (name, g)
        assert abs(g[0.01][name] - g[1.0][name]) > 0.01, (name, g)


def test_rollouts_from_dump_rebuild_the_dumped_tokens():
    model, tok = lora_model(scale=0.3), tiny_tokenizer()
    rollouts = _rollouts(model, samples=3, tokens=10)
    weights = normalized(raw_saliences(model, rollouts, SIGNAL_NAMES), rollouts, CreditConfig(method="arca"))
    meta = {"run": "arca-r4-s0", "method": "arca", "rank": 4, "seed": 0, "step": 2}
    dump = token_table(rollouts, tok, ["p-a", "p-b"], torch.zeros(6), weights, meta)
    shuffled = dump.sample(frac=1.0, random_state=0)
    rebuilt, rows = rollouts_from_dump(tok, shuffled, {"p-a": PROMPTS[0], "p-b": PROMPTS[1]})
    pd.testing.assert_frame_equal(rows, dump)
    assert torch.equal(rebuilt.input_ids, rollouts.input_ids) or rebuilt.completion_mask.sum() == len(dump)
    again = normalized(raw_saliences(model, rebuilt, SIGNAL_NAMES), rebuilt, CreditConfig(method="arca"))
    frame = token_frame(rows, rebuilt, again)
    for name in SIGNAL_NAMES:  # same tokens, other padding: equal up to float32 rounding
        assert frame[f"a_{name}"].to_numpy() == pytest.approx(dump[f"a_{name}"].to_numpy(), rel=1e-3, abs=1e-5)
    with pytest.raises(ValueError, match="not in the probe prompts"):
        rollouts_from_dump(tok, dump, {"p-a": PROMPTS[0]})


def _stage_workspace(tmp_path, monkeypatch, dtype: str) -> dict:
    from stages.dump import dump_run

    params = _dump_workspace(tmp_path, monkeypatch)
    params["model"]["dtype"] = dtype
    checked = [] if dtype == "float32" else ["kl", "arca"]
    meta = {"run": "arca-r4-s0", "method": "arca", "rank": 4, "seed": 0}
    (tmp_path / "data/dumps").mkdir(parents=True)
    dump_run("arca-r4-s0", meta, params, checked).to_parquet(tmp_path / "data/dumps/arca-r4-s0.parquet")
    params["credit"].update(w_max=None, sharpening=1.0, top_entropy_quantile=0.2, reference="matched")
    params["study"] = {"runs": {"arca-r4-s0": {"method": "arca", "rank": 4, "seed": 0}}}
    params["diagnostics"] = {"formatting_tokens": ["<|im_end|>", "the"]}
    params["degeneration"] = {"scales": [0, 0.01, 0.1, 1], "batch_size": 4, "runs": None}
    return params


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stage_writes_the_map_and_the_table_reads_it(tmp_path, monkeypatch, dtype):
    import yaml
    from click.testing import CliRunner

    from stages.degeneration import main
    from tests.params import default_params

    params = _stage_workspace(tmp_path, monkeypatch, dtype)
    params = default_params({**params, "faithfulness": {"runs": ["arca-r4-s0"]}})  # validated whole, first
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(main, [], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "data/degeneration/degeneration.parquet")
    dtypes = {"float32"} | {dtype}
    assert set(table["dtype"]) == dtypes and set(table["signal"]) == set(SIGNAL_NAMES)
    assert len(table) == len(SIGNAL_NAMES) * 4 * len(dtypes) and (table["step"] == 2).all()
    f32 = table[table["dtype"] == "float32"].set_index(["signal", "scale"])
    assert (f32.xs(0.0, level="scale").loc[["arca", "kl", "arca_local"], "fallback_rate"] == 1.0).all()
    assert (f32.xs(1.0, level="scale").loc[["arca", "kl"], "fallback_rate"] == 0.0).all()
    assert f32["noise_share"].isna().all()
    size = table.groupby("scale")["update_size"].first()
    assert size[0.0] == 0.0 and size[1.0] == pytest.approx(100 * size[0.01], rel=1e-6)
    kl32 = table.groupby("scale")["kl32"].first()
    assert kl32[0.0] == 0.0 and kl32[0.01] < kl32[0.1] < kl32[1.0]
    if dtype == "bfloat16":  # the run's dtype against float32: a noise share for every checked signal
        low = table[table["dtype"] == "bfloat16"].set_index(["signal", "scale"])
        assert low.loc[("kl", 1.0), "noise_share"] >= 0 and low.loc[("arca", 0.1), "noise_share"] > 0
        assert low.xs(0.0, level="scale").loc[["arca", "kl"], "noise_share"].eq(0.0).all()  # exact 0 in both
        assert low.loc[("uniform", 1.0), "noise_share"] != low.loc[("uniform", 1.0), "noise_share"]  # not checked
    lineage = pd.DataFrame({"run": ["arca-r4-s0"], "adapter_md5": ["a"], "dump_md5": ["d"]})
    cells = degeneration_table(table, lineage)
    assert {"c", "kl32", "size", "gini", "noise_share", "noise_dominated", "dump_md5"} <= set(cells.columns)
    assert len(cells) == len(table)
    degeneration_figure(table, tmp_path / "degeneration.png")
    assert (tmp_path / "degeneration.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_params_name_the_key():
    from stages.degeneration import degeneration_params

    base = {"study": {"runs": {"arca-r4-s0": {}}}}
    for bad, key in (({"scales": [-1], "batch_size": 2}, "scales"), ({"scales": [1], "batch_size": 0}, "batch_size"),
                     ({"scales": [1], "batch_size": 2, "runs": ["nope"]}, "runs")):  # fmt: skip
        with pytest.raises(ValueError, match=f"params.yaml: degeneration.{key}"):
            degeneration_params({**base, "degeneration": bad})
    ok = degeneration_params({**base, "degeneration": {"scales": [1, 0], "batch_size": 2, "runs": None}})
    assert ok == {"scales": [0.0, 1.0], "batch_size": 2, "runs": ["arca-r4-s0"]}
