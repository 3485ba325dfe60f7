"""Stage `base`: materialize the base model and tokenizer into data/models/base/.

python -m stages.base [--params params.yaml] [--out data/models/base]
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from stages.common import check_model_source, load_valid


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default="data/models/base", type=click.Path(file_okay=False))
def main(params_path: str, out: str) -> None:
    model_params = load_valid(params_path)[1].model  # the whole file first: no model work on a bad edit
    try:
        check_model_source(model_params)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    from arca.io import atomic_path  # heavy imports (torch, transformers) only after validation
    from arca.models.base import ModelSpec, load_base, save_base

    spec = ModelSpec(
        profile=model_params.profile,
        package=model_params.package,
        gguf_file=model_params.gguf_file,
        hub_id=model_params.hub_id,
        dtype=model_params.dtype,
    )
    model, tokenizer = load_base(spec)
    with atomic_path(Path(out)) as tmp:
        save_base(model, tokenizer, tmp)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
