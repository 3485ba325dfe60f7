"""A permuted run end to end on the stage side: its run id (`arca_perm-r4-s3`) names the cell, the train stage
trains ARCA with `permute` on, and budget.json / metrics.json record it as its own method; the dump, evaluate
and diagnose stages look its credit up under the signal's name."""

from __future__ import annotations

import json
from dataclasses import replace

import click
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from arca.credit.config import METHODS, PERMUTED_SUFFIX, run_method, split_run_method
from stages.common import parse_run_id, run_id
from stages.diagnose import main as diagnose_cli
from stages.dump import main as dump_cli
from stages.evaluate import main as evaluate_cli
from stages.profile import compose
from stages.train import main as train_cli
from stages.train import resolve_run, settings_from_params
from tests.analysis.test_concentration import _noise_dumps
from tests.run.test_training import PARAMS, write_prompts
from tests.tiny import tiny_model, tiny_tokenizer


def test_method_labels_and_run_ids_round_trip():
    for method in METHODS:
        for permute in (False, True) if method != "uniform" else (False,):
            label = run_method(method, permute)
            assert split_run_method(label) == (method, permute)
            assert parse_run_id(run_id(label, 64, 2)) == (label, 64, 2)
    assert run_method("arca", True) == f"arca{PERMUTED_SUFFIX}" == "arca_perm"
    for bad in ("uniform_perm", "foo", "arca_perm_perm"):
        with pytest.raises(ValueError, match="is not a method"):
            split_run_method(bad)
    with pytest.raises(ValueError, match="is not <method>-r<rank>-s<seed>"):
        parse_run_id("arca-r8")


def test_resolve_run_from_the_id_or_its_parts():
    assert resolve_run("arca_perm-r64-s2", None, None, None) == ("arca_perm-r64-s2", "arca", 64, 2, True)
    assert resolve_run("kl-r8-s0", "kl", 8, 0) == ("kl-r8-s0", "kl", 8, 0, False)
    assert resolve_run(None, "arca", 4, None) == ("arca-r4-s0", "arca", 4, 0, False)
    with pytest.raises(click.UsageError, match="--rank 4 disagrees with --run arca-r8-s0"):
        resolve_run("arca-r8-s0", None, 4, None)
    with pytest.raises(click.UsageError, match="give --run"):
        resolve_run(None, "arca", None, None)


def test_settings_carry_permute_into_the_credit(tmp_path):
    _, credit = settings_from_params(PARAMS, "arca", 4, 3, tmp_path, permute=True)
    _, plain = settings_from_params(PARAMS, "arca", 4, 3, tmp_path)
    assert credit.permute and not plain.permute and credit.method == plain.method == "arca"


def test_train_stage_trains_a_permuted_run(tmp_path, monkeypatch):
    (tmp_path / "data/prepared").mkdir(parents=True)
    write_prompts(tmp_path / "data/prepared/train.parquet", n=2)
    tiny_model().save_pretrained(tmp_path / "data/models/base")
    tiny_tokenizer().save_pretrained(tmp_path / "data/models/base")
    monkeypatch.chdir(tmp_path)
    params = json.loads(json.dumps(PARAMS))
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    result = CliRunner().invoke(train_cli, ["--run", "arca_perm-r4-s3"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "data/runs/arca_perm-r4-s3"
    budget = json.loads((out / "budget.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert (budget["method"], budget["permute"], budget["rank"], budget["seed"]) == ("arca_perm", True, 4, 3)
    assert (metrics["method"], metrics["permute"]) == ("arca_perm", True)
    result = CliRunner().invoke(train_cli, ["--run", "uniform_perm-r4-s0"])
    assert result.exit_code != 0 and "is not a method" in result.output


def test_diagnose_looks_a_permuted_run_up_under_its_signal(tmp_path, monkeypatch):
    dumps = _noise_dumps()
    dumps["method"] = dumps["method"].replace({"arca": "arca_perm"})
    dumps["run"] = dumps["run"].replace({"arca-r8-s0": "arca_perm-r8-s0"})
    (tmp_path / "data/dumps").mkdir(parents=True)
    for run, frame in dumps.groupby("run"):
        frame.to_parquet(tmp_path / "data/dumps" / f"{run}.parquet")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(compose("embedded")))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(diagnose_cli, [])
    assert result.exit_code == 0, result.output
    noise = pd.read_parquet(tmp_path / "data/diagnostics/noise.parquet")
    assert set(noise["method"]) == {"arca_perm"} and len(noise) == 3


def test_dump_and_evaluate_take_the_run_id(tmp_path, monkeypatch):
    """Both resolve `--run arca_perm-r8-s0` to its files (and the dump checks ARCA's credit params) before
    anything loads: here they stop at the missing budget.json / adapter of that very run."""
    params = compose("embedded")
    params["evaluate"]["primary"] = next(iter(params["data"]["eval"]))  # whichever sets the profile evaluates
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    dumped = CliRunner().invoke(dump_cli, ["--run", "arca_perm-r8-s0"])
    assert isinstance(dumped.exception, FileNotFoundError) and "data/runs/arca_perm-r8-s0/budget.json" in str(
        dumped.exception
    )
    evaluated = CliRunner().invoke(evaluate_cli, ["--run", "arca_perm-r8-s0"])
    assert isinstance(evaluated.exception, FileNotFoundError)
    assert "data/runs/arca_perm-r8-s0/adapter: no trained adapter" in str(evaluated.exception)
    assert "give --run" in CliRunner().invoke(dump_cli, ["--method", "arca"]).output


def test_credit_config_takes_a_runs_method_label():
    from stages.credit_params import credit_config

    params = compose("embedded")
    assert credit_config(params, "arca_perm") == replace(credit_config(params, "arca"), permute=True)
    for bad in ("foo", "uniform_perm"):
        with pytest.raises(ValueError, match=r"study.runs.<run>.method: must be one of uniform"):
            credit_config(params, bad)
