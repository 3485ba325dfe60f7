"""Apply a params profile: deep-merge its keys into params.yaml (atomically), so `dvc repro` or
`dvc exp run` then runs that profile and git shows exactly what changed.

    python -m stages.profile params-paper.yaml [--into params.yaml]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from arca.io import write_text


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` wins; nested mappings merge key by key, lists and scalars are replaced whole."""
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@click.command()
@click.argument("profile", type=click.Path(exists=True, dir_okay=False))
@click.option("--into", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(profile: str, into: str) -> None:
    merged = deep_merge(yaml.safe_load(Path(into).read_text()) or {}, yaml.safe_load(Path(profile).read_text()) or {})
    write_text(
        into,
        f"# {into} with {profile} applied by `python -m stages.profile`\n"
        + yaml.safe_dump(merged, sort_keys=False, width=110),
    )
    click.echo(f"applied {profile} to {into}; run `dvc repro` (or `dvc exp run`) next")


if __name__ == "__main__":
    main()
