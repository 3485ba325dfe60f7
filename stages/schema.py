"""The one params schema: every section and key of params.yaml typed and bounded (pydantic v2, unknown keys
forbidden), checked by the `validate` stage before any train cell runs. Errors name the dotted key and, for a
typo, the closest valid one: "params.yaml: `train.lerning_rate`: unknown key; did you mean
`train.learning_rate`?".

The choices come from the library's torch-free tables, `arca.methods` (methods, schemes, fallbacks, reference
modes) and `arca.choices` (loss types, schedulers, dtypes, devices, graders, engines), so validating costs a
pydantic import and no torch, and no list is written out twice. The library (`arca`) checks its own arguments
and names them as arguments, for callers without a params.yaml.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from arca.choices import DEVICES, DTYPES, ENGINES, GRADERS, LOSS_TYPES, LR_SCHEDULERS
from arca.methods import FALLBACKS, METHODS, PERMUTED_SUFFIX, REFERENCE_MODES, SCHEMES
from arca.tasks.boxed import extract_boxed
from stages.strict import Strict, describe

Method = Literal[METHODS]  # arca.methods: the one method table (torch-free, like arca.choices)
PositiveInt = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Select = Literal["sample", "first"]


Fallback = Literal[FALLBACKS]
Scheme = Literal[SCHEMES]


class Run(Strict):
    method: Method
    rank: PositiveInt
    seed: Count
    permute: bool = False  # SPEC 3's permutation control; absent = false

    @model_validator(mode="after")
    def _permute_needs_a_salience(self) -> Run:
        if self.permute and self.method == "uniform":
            raise ValueError("permute: true needs a salience method; uniform weights are all 1 (drop permute)")
        return self


class Study(Strict):
    runs: Annotated[dict[str, Run], Field(min_length=1)]

    @model_validator(mode="after")
    def _ids_name_their_cell(self) -> Study:
        for run_id, run in self.runs.items():
            label = f"{run.method}{PERMUTED_SUFFIX if run.permute else ''}"
            expected = f"{label}-r{run.rank}-s{run.seed}"
            if run_id != expected:  # dvc.yaml names stages and paths by the id (`${key}`) and derives the cell from it
                twin = (  # two ids of one cell: one train cell and one set of outputs for both, so name both
                    f"; {run_id!r} and {expected!r} are the same cell (method {run.method}, rank {run.rank}, seed "
                    f"{run.seed}{', permute' if run.permute else ''}): drop one, or change its method, rank or seed"
                    if expected in self.runs
                    else ""
                )
                raise ValueError(
                    f"run id {run_id!r} must be {expected!r} (<method>[{PERMUTED_SUFFIX} if permute]-r<rank>-s<seed>)"
                    + twin
                )
        return self


class Model(Strict):
    profile: Literal["embedded", "hub", "tiny"]
    package: str | None
    gguf_file: str | None
    hub_id: str | None
    dtype: Literal[DTYPES]
    chat_template_kwargs: dict[str, Any]

    @model_validator(mode="after")
    def _hub_needs_an_id(self) -> Model:
        if self.profile == "hub" and not self.hub_id:
            raise ValueError("model.profile hub needs model.hub_id (e.g. Qwen/Qwen3-1.7B)")
        return self


class _Filters(Strict):
    """The MATH filters of a train or eval block: null is no filter, an empty list would select nothing."""

    @field_validator("levels", "subjects", check_fields=False)
    @classmethod
    def _not_empty(cls, value: list | None) -> list | None:
        if value is not None and not value:
            raise ValueError("is empty; use null for no filter")
        return value


class TrainData(_Filters):
    source: Literal["arithmetic", "math", "reasoning"]
    n: PositiveInt | None
    select: Select
    levels: list[Annotated[int, Field(ge=1, le=5)]] | None
    subjects: list[str] | None
    max_answer_chars: PositiveInt | None
    seed: int

    @model_validator(mode="after")
    def _null_n_only_for_math(self) -> TrainData:
        if self.n is None and self.source != "math":
            raise ValueError(
                f"data.train.n must be a positive int for source {self.source} (null, every usable "
                "problem, only for source math)"
            )
        return self


class ArithmeticEval(Strict):
    n: PositiveInt


class ReasoningEval(Strict):
    n: PositiveInt


class MathEval(_Filters):
    split: Literal["math500", "test"]
    n: PositiveInt | None
    select: Select
    levels: list[Annotated[int, Field(ge=1, le=5)]] | None
    subjects: list[str] | None
    max_answer_chars: PositiveInt | None
    seed: int


class EvalData(Strict):
    arithmetic: ArithmeticEval | None = None
    math: MathEval | None = None
    reasoning: ReasoningEval | None = None


class Probe(Strict):
    n: PositiveInt
    seed: int


class Data(Strict):
    source: Literal["embedded", "path", "hub"]
    path: str | None
    hub_name: str | None
    hub_config: str | None
    train: TrainData
    eval: EvalData
    probe: Probe

    @model_validator(mode="after")
    def _source_has_what_it_needs(self) -> Data:
        if self.source == "path" and not self.path:
            raise ValueError("data.path is required when data.source is 'path'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.hub_name is required when data.source is 'hub'")
        math = self.eval.math
        if math is not None and math.split == "math500" and self.source == "hub":
            raise ValueError(
                "data.eval.math.split: math500 cannot come from data.source hub (data.hub_name is one dataset for "
                "train and test); use split: test, or data.source: embedded"
            )
        if math is not None and math.split == "math500" and self.source == "path":
            if not str(self.path).lower().endswith((".jsonl", ".parquet")):
                raise ValueError(
                    f"data.eval.math.split: math500 but data.path {self.path} is a MATH tarball or folder, which "
                    "holds the full 5,000-problem test split; use split: test, point data.path at a MATH-500 "
                    ".jsonl, or use data.source: embedded"
                )
        return self


class FewShot(Strict):
    problem: str
    answer: str

    @field_validator("answer")
    @classmethod
    def _boxed(cls, answer: str) -> str:
        if extract_boxed(answer) is None:  # the model learns its answer format here
            raise ValueError("has no complete \\boxed{...}; end it with one")
        return answer


class Prompt(Strict):
    format: Literal["chat", "raw"]
    template: str | None
    system: str | None
    few_shot: list[FewShot]

    @model_validator(mode="after")
    def _what_each_format_allows(self) -> Prompt:
        if self.format == "chat":
            if self.template is not None:
                raise ValueError("prompt.template is used only with prompt.format: raw; remove it or set raw")
            return self
        if not self.template or "{problem}" not in self.template:
            raise ValueError("prompt.format raw needs prompt.template containing {problem}")
        if self.few_shot:
            raise ValueError(
                "prompt.few_shot must be empty when prompt.format is raw (the template is the whole prompt); use [] "
                "or prompt.format: chat"
            )
        if self.system is not None:
            raise ValueError(
                "prompt.system must be null when prompt.format is raw (put the instruction in prompt.template); use "
                "null or prompt.format: chat"
            )
        return self


class Lora(Strict):
    # int | float: the number as written, so `alpha: 16` reaches LoraConfig (and the run's settings hash) as 16
    alpha: Annotated[int | float, Field(gt=0)] | None
    alpha_per_rank: Positive | None
    dropout: Annotated[float, Field(ge=0, lt=1)]
    target_modules: str | list[str]

    @model_validator(mode="after")
    def _one_alpha(self) -> Lora:
        if (self.alpha is None) == (self.alpha_per_rank is None):
            raise ValueError("set exactly one of lora.alpha and lora.alpha_per_rank (the other null)")
        return self


class Train(Strict):
    learning_rate: Positive
    lr_scheduler_type: Literal[LR_SCHEDULERS]
    warmup_steps: Count
    max_grad_norm: NonNegative
    weight_decay: NonNegative
    max_steps: PositiveInt
    prompts_per_step: PositiveInt
    num_generations: Annotated[int, Field(ge=2)]
    gradient_accumulation_steps: PositiveInt
    max_prompt_length: PositiveInt | None
    max_completion_length: PositiveInt
    temperature: Positive
    top_p: Annotated[float, Field(gt=0, le=1)] | None
    top_k: Count | None
    beta: NonNegative
    loss_type: Literal[LOSS_TYPES]
    grader: Literal[GRADERS]
    save_steps: PositiveInt
    logging_steps: PositiveInt
    use_vllm: bool
    vllm_mode: Literal["colocate", "server"]
    vllm_importance_sampling_correction: bool
    gradient_checkpointing: bool
    device: Literal[DEVICES]
    num_processes: PositiveInt
    launcher: str


class MethodCredit(Strict):
    """One method's block under `credit.methods` (composed from the shared keys by conf/credit_methods/)."""

    scheme: Scheme | None = None
    tau: Positive | None = None
    mix: Fraction | None = None
    w_max: Annotated[float, Field(ge=1)] | None = None
    eps: NonNegative | None = None
    sharpening: Positive | None = None
    salience_dropout: bool | None = None
    reference: Literal[REFERENCE_MODES] | None = None
    layer: int | None = None
    fallback: Fallback | None = None
    top_entropy_quantile: Annotated[float, Field(gt=0, le=1)] | None = None


class Credit(Strict):
    scheme: Scheme
    tau: Positive
    mix: Fraction
    w_max: Annotated[float, Field(ge=1)] | None
    layer: int
    eps: NonNegative
    sharpening: Positive
    reference: Literal[REFERENCE_MODES]
    salience_dropout: bool
    top_entropy_quantile: Annotated[float, Field(gt=0, le=1)]
    fallback: Fallback
    methods: dict[Method, MethodCredit]

    @model_validator(mode="after")
    def _every_method_has_a_block(self) -> Credit:
        missing = [m for m in METHODS if m not in self.methods]
        if missing:
            raise ValueError(f"credit.methods lacks {', '.join(missing)}; compose params.yaml from conf/ (make params)")
        return self


class Dump(Strict):
    samples: PositiveInt
    seed: int
    batch_size: PositiveInt
    engine: Literal[ENGINES]


class Diagnostics(Strict):
    etr_uniform: Fraction
    etr_concentrated: Fraction
    top_frac: Annotated[float, Field(gt=0, le=1)]
    formatting_tokens: list[str]

    @model_validator(mode="after")
    def _bands_are_ordered(self) -> Diagnostics:
        if not self.etr_concentrated < self.etr_uniform:
            raise ValueError("diagnostics.etr_concentrated must be below diagnostics.etr_uniform")
        return self


class Evaluate(Strict):
    k: PositiveInt
    max_new_tokens: PositiveInt
    temperature: Positive
    top_p: Annotated[float, Field(gt=0, le=1)] | None
    top_k: Count | None
    seed: int
    batch_size: PositiveInt
    primary: Literal["arithmetic", "math", "reasoning"]
    engine: Literal[ENGINES]


class Faithfulness(Strict):
    """SPEC 9: counterfactual token effects on the probe completions of `runs` (ids of study.runs)."""

    runs: Annotated[list[str], Field(min_length=1)]
    steps: Literal["final"] | Annotated[list[Count], Field(min_length=1)]
    max_positions: PositiveInt
    batch_size: PositiveInt
    seed: int


class Degeneration(Strict):
    """SPEC 10: every run's final adapter scaled by each of `scales` on its own probe completions."""

    scales: Annotated[list[NonNegative], Field(min_length=1)]
    batch_size: PositiveInt
    runs: Annotated[list[str], Field(min_length=1)] | None  # null: every run of study.runs


class Figures(Strict):
    heatmap_prompts: PositiveInt
    heatmap_run: str | None
    seed: int
    lorenz_by: Literal["phase", "rank"]


class Params(Strict):
    profile: str
    study: Study
    model: Model
    data: Data
    prompt: Prompt
    lora: Lora
    train: Train
    credit: Credit
    dump: Dump
    diagnostics: Diagnostics
    evaluate: Evaluate
    faithfulness: Faithfulness
    degeneration: Degeneration
    figures: Figures

    @model_validator(mode="after")
    def _cross_section(self) -> Params:
        if getattr(self.data.eval, self.evaluate.primary) is None:
            raise ValueError(f"evaluate.primary {self.evaluate.primary!r} names no set of data.eval")
        run = self.figures.heatmap_run
        if run is not None and run not in self.study.runs:
            raise ValueError(f"figures.heatmap_run {run!r} is not a run of study.runs")
        unknown = [r for r in self.faithfulness.runs if r not in self.study.runs]
        if unknown:
            raise ValueError(f"faithfulness.runs {unknown} are not runs of study.runs: {', '.join(self.study.runs)}")
        unknown = [r for r in self.degeneration.runs or [] if r not in self.study.runs]
        if unknown:
            raise ValueError(f"degeneration.runs {unknown} are not runs of study.runs: {', '.join(self.study.runs)}")
        per_step = self.train.prompts_per_step * self.train.num_generations
        split = self.train.gradient_accumulation_steps * self.train.num_processes
        if per_step % split:
            raise ValueError(
                f"train.prompts_per_step x train.num_generations = {per_step} must divide into "
                f"train.gradient_accumulation_steps x train.num_processes = {split}"
            )
        return self


def validate(params: dict[str, Any], source: str = "params.yaml") -> Params:
    """`params` checked against the schema; a `ParamsError` lists every offending key, one per line."""
    try:
        return Params.model_validate(params)
    except ValidationError as err:
        raise describe(err, Params, source) from None
