"""`arca inspect` end to end: sample K completions per prompt from base + adapter, compute every signal's
saliences and weights on them with the pipeline's dump code (`arca.sampling.dump`, so a row equals the dump
stage's on the same completions), grade them where the prompt has an answer, and write

    tokens.parquet      the SPEC 6 dump (every signal's a_ and w_; a32_ columns when --dtype is not float32)
    concentration.md    SPEC 5 per signal (`arca.analysis.concentration`, `arca.analysis.tables`)
    effects.parquet, faithfulness.md   SPEC 9, when answers are given and --faithfulness is on
    explorer.html       the token explorer (`arca.analysis.explorer`)

Every input is checked first (`arca.inspect.checks`); the model is loaded only after.

Left out: the pipeline's per-method credit params (one `CreditConfig` with SPEC 3's defaults normalizes every
signal here) and chat-template keywords (a Qwen3 `enable_thinking` switch needs a template of your own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from arca.inspect.checks import Adapter, Base, check_adapter, check_adapter_fits, read_prompts, resolve_base

log = logging.getLogger("arca.inspect")
UNKNOWN_METHOD = "unknown"  # the `method` column: nothing in a PEFT adapter says how it was trained
UNKNOWN_SEED = -1  # the `seed` column (the training seed), as the base model's evaluation writes it
FORMATS = ("chat", "raw")
# SPEC 5's formatting tokens for the agnostic share: the embedded profile's list (a test keeps them equal).
FORMATTING_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\\", "$", "\\boxed", "boxed", "{", "}"]
FORMATTING_TOKENS += ["the", "we", "is", "answer", "so", "therefore", "thus", "a", "of", "to", "and"]


@dataclass(frozen=True)
class InspectSettings:
    """What `arca inspect` runs (the CLI's options, `arca inspect --help`)."""

    base: str
    adapter: Path
    prompts: Path
    out: Path
    samples: int = 4  # completions per prompt: group advantages need > 1
    max_new_tokens: int = 256
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on CPU (`arca.models.base.resolve_dtype`)
    faithfulness: bool = True  # SPEC 9 where answers are given: 2 greedy decodes per scored position
    format: str | None = None  # chat | raw; None: chat when the tokenizer has a chat template
    run: str | None = None  # the `run` column; None: the adapter directory's name
    seed: int = 0  # sampling and position seed
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    grader: str = "math_verify"
    max_positions: int = 16  # SPEC 9 scored positions per completion
    batch_size: int = 8


@dataclass(frozen=True)
class Checked:
    """The inputs after `check`: prompts (prompt_id, problem, answer, messages), the adapter, the base, the run id
    and the checkpoint step."""

    problems: pd.DataFrame
    adapter: Adapter
    base: Base
    run: str
    step: int


def check(settings: InspectSettings) -> Checked:
    """Every check that needs no model: the prompts file, the adapter, the adapter against the base."""
    problems = read_prompts(settings.prompts)
    adapter = check_adapter(settings.adapter)
    base = resolve_base(settings.base)
    modules = check_adapter_fits(adapter, settings.base, base.shapes)
    log.info("%d prompts; adapter r=%d, %d LoRA modules fit %s", len(problems), adapter.rank, modules, settings.base)
    run = settings.run or Path(settings.adapter).resolve().name
    return Checked(problems, adapter, base, run, adapter_step(Path(settings.adapter)))


def adapter_step(path: Path) -> int:
    """The checkpoint step of an adapter directory: `checkpoint-<n>` (TRL, transformers) or `step-<n>` (this
    pipeline's snapshots), else `global_step` of a trainer_state.json inside it, else 0."""
    match = re.fullmatch(r"(?:checkpoint|step)-(\d+)", path.resolve().name)
    if match:
        return int(match.group(1))
    state = path / "trainer_state.json"
    if state.is_file():
        step = json.loads(state.read_text()).get("global_step")
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return 0


def inspect_adapter(settings: InspectSettings) -> dict[str, Path]:
    """Check, load, sample, score and write (module docstring). Returns output name -> path."""
    checked = check(settings)
    tokenizer = load_tokenizer(settings, checked.base)
    chat = use_chat(tokenizer, settings.format)
    if not chat and checked.problems["messages"].notna().any():
        first = checked.problems.loc[checked.problems["messages"].notna(), "prompt_id"].iat[0]
        raise ValueError(
            f"--prompts: {first} has `messages`, a chat prompt, but the prompts go in as raw text (--format raw, or "
            "a tokenizer without a chat template); drop the messages or use a tokenizer with a template"
        )
    from arca.inspect.scoring import load_policy, write_outputs  # torch only after every check passed

    model = load_policy(settings, checked.base)
    return write_outputs(settings, checked, model, tokenizer, chat)


def load_tokenizer(settings: InspectSettings, base: Base):
    """The adapter's own tokenizer when it was saved with one (TRL saves it beside each checkpoint: its chat
    template and added tokens are what training saw), else the base's; a missing pad token becomes EOS."""
    from transformers import AutoTokenizer

    own = (Path(settings.adapter) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(settings.adapter if own else (base.folder or base.name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def use_chat(tokenizer, fmt: str | None) -> bool:
    """Whether prompts go through the chat template: `chat` needs one, `raw` never, None: when there is one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "chat" and not has_template:
        raise ValueError("--format chat: the tokenizer has no chat template; use --format raw (the text as it is)")
    return has_template if fmt is None else fmt == "chat"


def prompts_of(problems: pd.DataFrame, chat: bool) -> list:
    """The prompt of each problem: its `messages`, or one user message holding the problem (chat); the problem text
    itself (raw)."""
    if not chat:
        return problems["problem"].tolist()
    return [
        m if m is not None else [{"role": "user", "content": p}]
        for p, m in zip(problems["problem"], problems["messages"])
    ]


def settings_md5(settings: InspectSettings) -> str:
    """md5 of the settings that change the numbers (not where they are written), recorded in the Parquet metadata."""
    fields = {k: str(v) for k, v in asdict(settings).items() if k != "out"}
    return hashlib.md5(json.dumps(fields, sort_keys=True).encode()).hexdigest()
