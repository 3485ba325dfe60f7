"""`CreditGRPOConfig` (TRL's `GRPOConfig` + `credit_*`), `CreditConfig` errors, `TrlParser` recipes and the public
surface of `arca`."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import trl
import yaml

import arca
from arca.credit.config import METHODS, CreditConfig, CreditConfigError
from arca.grpo.config import ARGUMENTS, REPORT_TO_ENV, CreditGRPOConfig, credit_arguments, report_to_from_env


def grpo(tmp_path, **kwargs) -> CreditGRPOConfig:
    return CreditGRPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, **kwargs)


def test_is_a_grpo_config_with_credit_defaults(tmp_path):
    args = grpo(tmp_path)
    assert isinstance(args, trl.GRPOConfig)
    assert args.credit == CreditConfig("arca")
    assert args.top_entropy_quantile == 1.0
    # Documented like TRL's fields: every credit_* field has a help text and a `Parameters:` entry.
    for name in ARGUMENTS.values():
        if name.startswith("credit_"):
            assert CreditGRPOConfig.__dataclass_fields__[name].metadata["help"], name
            assert f"{name} (`" in CreditGRPOConfig.__doc__, name


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, []), ("", []), ("none", []), (" tensorboard ,tensorboard", ["tensorboard"]), ("all", None)],
)
def test_report_to_comes_from_arca_report_to_when_not_given(tmp_path, monkeypatch, value, expected):
    from transformers.integrations import get_available_reporting_integrations

    if value is None:
        monkeypatch.delenv(REPORT_TO_ENV, raising=False)
    else:
        monkeypatch.setenv(REPORT_TO_ENV, value)
    if "tensorboard" in (value or "") and "tensorboard" not in get_available_reporting_integrations():
        pytest.skip("no TensorBoard writer installed (tensorboardX is a test dependency: make setup)")
    args = CreditGRPOConfig(output_dir=str(tmp_path), bf16=False)
    assert args.report_to == (get_available_reporting_integrations() if expected is None else expected)
    monkeypatch.setenv(REPORT_TO_ENV, "tensorboard")
    assert CreditGRPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none").report_to == []  # given wins


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tensorbord", r"ARCA_REPORT_TO='tensorbord': unknown tracker\(s\) \['tensorbord'\]; .*'tensorboard'"),
        ("none,wandb_typo", r"unknown tracker\(s\) \['none', 'wandb_typo'\]"),
    ],
)
def test_report_to_errors_name_the_variable(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        report_to_from_env({REPORT_TO_ENV: value})


def test_report_to_names_a_tracker_that_is_not_installed(monkeypatch):
    import transformers.integrations.integration_utils as hf

    monkeypatch.setattr(hf, "get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(ValueError, match=r"\['wandb'\] not installed .*installed trackers: \['tensorboard'\]"):
        report_to_from_env({REPORT_TO_ENV: "tensorboard,wandb"})
    assert report_to_from_env({REPORT_TO_ENV: "tensorboard"}) == ["tensorboard"]


def test_top_entropy_sets_its_quantile(tmp_path):
    assert grpo(tmp_path, credit_method="top_entropy").top_entropy_quantile == 0.2
    args = grpo(tmp_path, credit_method="top_entropy", top_entropy_quantile=0.3)
    assert args.top_entropy_quantile == args.credit.top_entropy_quantile == 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"credit_method": "foo"}, "credit_method: must be one of uniform, surprisal"),
        ({"credit_tau": 0}, "credit_tau: must be > 0, got 0"),
        ({"credit_mix": 1.5}, r"credit_mix: must be in \[0, 1\], got 1.5"),
        ({"credit_w_max": 0.5}, "credit_w_max: must be None or >= 1"),
        ({"credit_scheme": "max"}, "credit_scheme: must be one of mean, softmax, rank, got 'max'"),
        ({"credit_reference": "cached"}, "credit_reference: must be one of matched, reuse"),
        ({"credit_sharpening": 0.0}, "credit_sharpening: must be > 0"),
        ({"credit_eps": -1.0}, "credit_eps: must be >= 0"),
        ({"credit_layer": 1.5}, "credit_layer: must be an int"),
        ({"credit_fallback": "mean"}, "credit_fallback: must be one of raw_mean, sharpened_sum, got 'mean'"),
        ({"credit_permute": 1}, "credit_permute: must be True or False, got 1"),
        ({"credit_method": "uniform", "credit_permute": True}, "credit_permute: uniform weights are all 1"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile: would mask tokens on top of credit_method 'arca'"),
        ({"credit_method": "top_entropy", "top_entropy_quantile": 0.0}, r"top_entropy_quantile: must be in \(0, 1\]"),
    ],
)
def test_errors_name_the_argument(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        grpo(tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "foo"}, "method: must be one of uniform"),
        ({"method": "arca", "tau": 0}, "tau: must be > 0, got 0"),
        ({"method": "arca", "mix": -0.1}, r"mix: must be in \[0, 1\], got -0.1"),
        ({"method": "arca", "w_max": 0.5}, "w_max: must be None or >= 1"),
        ({"method": "arca", "scheme": "max"}, "scheme: must be one of mean, softmax, rank"),
        ({"method": "arca", "salience_dropout": 1}, "salience_dropout: must be True or False, got 1"),
    ],
)
def test_credit_config_errors_name_the_field(kwargs, message):
    with pytest.raises(CreditConfigError, match=f"^{message}") as caught:
        CreditConfig(**kwargs)
    field_name = message.split(":")[0]
    assert caught.value.field == field_name
    assert str(caught.value.renamed(f"credit.{field_name}")) == f"credit.{caught.value}"


def test_diagnostics_thresholds_are_not_credit_knobs():
    assert not {"etr_uniform", "etr_concentrated"} & set(CreditConfig.__dataclass_fields__)


@pytest.mark.parametrize("method", METHODS)
def test_credit_arguments_round_trip(tmp_path, method):
    quantile = {"top_entropy_quantile": 0.3} if method == "top_entropy" else {}  # a knob of top_entropy only
    credit = CreditConfig(method, scheme="softmax", tau=0.5, mix=0.8, w_max=3.0, layer=1, **quantile)
    assert grpo(tmp_path, **credit_arguments(credit)).credit == credit


# ---- TrlParser: a whole run in one YAML recipe -------------------------------------------------------------------


@dataclass
class RecipeArguments:
    """A script's own arguments, as open-r1's `ScriptArguments`."""

    dataset_name: str = field(default="math", metadata={"help": "Dataset to train on."})
    num_problems: int = field(default=8, metadata={"help": "Problems to keep."})


def test_trl_parser_reads_a_yaml_recipe(tmp_path):
    recipe = {
        "dataset_name": "tiny-math",
        "output_dir": str(tmp_path / "run"),
        "report_to": "none",
        "bf16": False,
        "learning_rate": 1e-5,
        "num_generations": 4,
        "credit_method": "top_entropy",
        "credit_scheme": "softmax",
        "credit_tau": 0.5,
        "credit_w_max": 4.0,
        "credit_salience_dropout": True,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    parser = trl.TrlParser((RecipeArguments, CreditGRPOConfig))
    script, args = parser.parse_args_and_config(["--config", str(path), "--credit_tau", "0.25"])
    assert script == RecipeArguments(dataset_name="tiny-math", num_problems=8)
    assert isinstance(args, CreditGRPOConfig) and args.learning_rate == 1e-5 and args.num_generations == 4
    expected = CreditConfig(
        "top_entropy", scheme="softmax", tau=0.25, w_max=4.0, top_entropy_quantile=0.2, salience_dropout=True
    )
    assert args.credit == expected  # the command line overrides the recipe
    with pytest.raises(ValueError, match=r"^credit_tau: must be > 0"):
        parser.parse_args_and_config(["--config", str(path), "--credit_tau", "0"])
    help_text = parser.format_help()
    assert "--credit_method {uniform,surprisal," in help_text and "Salience signal" in help_text


# ---- public surface ----------------------------------------------------------------------------------------------


def test_public_api():
    from arca import CreditGRPOConfig as Config
    from arca import CreditGRPOTrainer, compute_signals, effective_token_ratio, gini, normalize
    from arca.credit.diagnostics import effective_token_ratio as etr
    from arca.credit.diagnostics import gini as diagnostics_gini
    from arca.credit.normalize import normalize as credit_normalize
    from arca.credit.signals import compute_signals as signals_compute
    from arca.grpo.trainer import CreditGRPOTrainer as Trainer

    assert Config is CreditGRPOConfig and CreditGRPOTrainer is Trainer and compute_signals is signals_compute
    assert normalize is credit_normalize and gini is diagnostics_gini and effective_token_ratio is etr
    assert set(arca.__all__) <= set(dir(arca))
    with pytest.raises(AttributeError, match="has no attribute 'Trainer'"):
        arca.Trainer  # noqa: B018


def test_importing_a_light_module_does_not_load_trl():
    code = (
        "import sys, arca.credit.normalize; assert 'trl' not in sys.modules and 'arca.grpo.trainer' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
