"""The `arca` console script (`[project.scripts]` in pyproject.toml): `arca inspect`, the pipeline's per-token
diagnostics on any PEFT LoRA adapter. A thin click layer over `arca.inspect.report`.

    arca inspect --base Qwen/Qwen3-1.7B --adapter runs/my-lora/checkpoint-500 --prompts probe.jsonl --out inspect/
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from arca.choices import DTYPES, GRADERS
from arca.inspect.report import FORMATS, InspectSettings, inspect_adapter


@click.group()
def main() -> None:
    """ARCA: token-level credit diagnostics for LoRA-GRPO."""


@main.command("inspect")
@click.option("--base", required=True, help="base model: a hub id or a local model directory")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="a PEFT LoRA adapter directory")
@click.option(
    "--prompts",
    required=True,
    type=click.Path(path_type=Path),
    help='JSON lines: {"problem": ..., "answer": ... (optional), "id": ... (optional)}',
)
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="output directory")
@click.option("--samples", default=4, show_default=True, type=click.IntRange(min=1), help="completions per prompt")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES), help="auto: bf16 on a GPU")
@click.option(
    "--faithfulness/--no-faithfulness",
    default=True,
    show_default=True,
    help="SPEC 9 counterfactual effects on the prompts with an answer (2 greedy decodes per scored position)",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="chat template or raw text [default: chat if any]")
@click.option("--run", default=None, help="the run id in the outputs [default: the adapter directory's name]")
@click.option("--seed", default=0, show_default=True, type=int, help="sampling and position seed")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: unfiltered")
@click.option("--grader", default="math_verify", show_default=True, type=click.Choice(GRADERS))
@click.option("--max-positions", default=16, show_default=True, type=click.IntRange(min=1), help="SPEC 9 positions")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
def inspect_command(fmt: str | None, **options) -> None:
    """Dump every credit signal of an adapter's completions on your prompts: tokens.parquet (SPEC 6),
    concentration.md (SPEC 5), faithfulness.md (SPEC 9, with answers) and explorer.html."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = InspectSettings(format=fmt, **options)
    try:  # a bad input is one line and a non-zero exit, never a traceback
        paths = inspect_adapter(settings)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
