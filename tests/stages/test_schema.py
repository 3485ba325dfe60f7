"""stages.schema: the one params schema. Its spelled-out choices equal the library's, every profile passes it,
and a bad key fails with its dotted path and the closest valid name."""

from __future__ import annotations

import typing

import pytest

from arca.credit.config import METHODS, PERMUTED_SUFFIX, REFERENCE_MODES
from arca.credit.normalize import FALLBACKS, SCHEMES
from arca.models.base import PROFILES
from arca.run.training import DTYPES, LOSS_TYPES, LR_SCHEDULERS
from arca.tasks.grading import GRADERS
from arca.tasks.sources import SELECTIONS
from stages import schema
from stages.common import ENGINES
from stages.prepare import SYNTHETIC, TRAIN_SOURCES
from stages.profile import compose, profile_names
from stages.strict import ParamsError


def _choices(model, field: str) -> tuple:
    annotation = model.model_fields[field].annotation
    literal = next(a for a in (annotation, *typing.get_args(annotation)) if typing.get_origin(a) is typing.Literal)
    return typing.get_args(literal)


def test_choices_equal_the_library():
    assert schema.METHODS == METHODS and typing.get_args(schema.Method) == METHODS
    assert _choices(schema.Credit, "scheme") == tuple(SCHEMES)
    assert _choices(schema.Credit, "reference") == REFERENCE_MODES
    assert _choices(schema.Credit, "fallback") == _choices(schema.MethodCredit, "fallback") == FALLBACKS
    assert schema.FALLBACKS == FALLBACKS and schema.PERMUTED_SUFFIX == PERMUTED_SUFFIX
    assert _choices(schema.Train, "loss_type") == LOSS_TYPES
    assert _choices(schema.Train, "lr_scheduler_type") == LR_SCHEDULERS
    assert _choices(schema.Train, "grader") == tuple(GRADERS)
    assert _choices(schema.TrainData, "select") == SELECTIONS
    assert _choices(schema.TrainData, "source") == TRAIN_SOURCES
    assert set(SYNTHETIC) | {"math"} == set(schema.EvalData.model_fields) == set(_choices(schema.Evaluate, "primary"))
    assert _choices(schema.Model, "profile") == PROFILES and _choices(schema.Model, "dtype") == DTYPES
    assert _choices(schema.Dump, "engine") == _choices(schema.Evaluate, "engine") == ENGINES


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_is_valid(name):
    assert schema.validate(compose(name)).profile == name


def _invalid(change) -> str:
    params = compose("embedded")
    change(params)
    with pytest.raises(ParamsError) as err:
        schema.validate(params)
    return str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p["train"].update(lerning_rate=1e-3),
            "params.yaml: `train.lerning_rate`: unknown key; did you mean `train.learning_rate`?",
        ),
        (
            lambda p: p["study"]["runs"]["arca-r8-s0"].update(rnak=8),
            "params.yaml: `study.runs.arca-r8-s0.rnak`: unknown key; did you mean `study.runs.arca-r8-s0.rank`?",
        ),
        (lambda p: p["study"]["runs"].update({"x": {"method": "arca", "rank": 8, "seed": 0}}), "must be 'arca-r8-s0'"),
        (
            lambda p: p["study"]["runs"].update(
                {"arca-r8-s1": {"method": "arca", "rank": 8, "seed": 1, "permute": True}}
            ),
            "run id 'arca-r8-s1' must be 'arca_perm-r8-s1'",
        ),
        (
            lambda p: p["study"]["runs"].update({"arca_perm-r8-s0": {"method": "arca", "rank": 8, "seed": 0}}),
            "run id 'arca_perm-r8-s0' must be 'arca-r8-s0'",
        ),
        (
            lambda p: p["study"]["runs"].update(
                {"uniform_perm-r8-s0": {"method": "uniform", "rank": 8, "seed": 0, "permute": True}}
            ),
            "permute: true needs a salience method",
        ),
        (lambda p: p["credit"].update(fallback="sharpened"), "`credit.fallback`: Input should be 'raw_mean' or"),
        (
            lambda p: p["credit"]["methods"]["kl"].update(fallback="raw"),
            "`credit.methods.kl.fallback`: Input should be",
        ),
        (lambda p: p["train"].update(max_steps=0), "params.yaml: `train.max_steps`: Input should be greater than 0"),
        (lambda p: p["credit"].update(mix=1.5), "`credit.mix`: Input should be less than or equal to 1, got 1.5"),
        (lambda p: p["credit"]["methods"].pop("kl"), "credit.methods lacks kl"),
        (lambda p: p["lora"].update(alpha_per_rank=2), "set exactly one of lora.alpha and lora.alpha_per_rank"),
        (
            lambda p: p["evaluate"].update(primary="gsm8k"),
            "`evaluate.primary`: Input should be 'arithmetic', 'math' or 'reasoning'",
        ),
        (lambda p: p["train"].update(gradient_accumulation_steps=3), "must divide into"),
        (lambda p: p.pop("figures"), "params.yaml: `figures` is missing"),
        (
            lambda p: p["faithfulness"].update(runs=["arca-r4-s9"]),
            "faithfulness.runs ['arca-r4-s9'] are not runs of study.runs",
        ),
        (lambda p: p["faithfulness"].update(steps="last"), "`faithfulness.steps"),
        (lambda p: p["faithfulness"].update(max_positions=0), "`faithfulness.max_positions`: Input should be greater"),
    ],
)
def test_errors_name_the_dotted_key(change, message):
    assert message in _invalid(change)


def test_numbers_written_as_strings_are_accepted():
    params = compose("embedded")
    params["train"]["learning_rate"] = "1e-3"  # YAML 1.1 reads an exponent without a dot as a string
    assert schema.validate(params).train.learning_rate == 1e-3


def test_a_permuted_cell_is_its_own_run():
    params = compose("embedded")
    params["study"]["runs"]["arca_perm-r8-s0"] = {"method": "arca", "rank": 8, "seed": 0, "permute": True}
    runs = schema.validate(params).study.runs
    assert runs["arca_perm-r8-s0"].permute is True and runs["arca-r8-s0"].permute is False  # absent = false
