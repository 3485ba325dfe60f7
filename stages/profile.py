"""Params profiles: conf/profile/<name>.yaml composed into params.yaml by DVC's own Hydra composition (the same
function `dvc exp run` calls, so the bytes are the same), for the commands that need params without running
an experiment.

    python -m stages.profile [embedded|paper|study] [-S key=value ...] [--out params.yaml]   # write
    python -m stages.profile --check                                   # params.yaml is conf/'s embedded profile

Running a profile is `dvc exp run -S profile=paper` (README); this command only writes or checks a params file
(`make params` after editing conf/profile/embedded.yaml). A profile is a complete file: composing replaces
every key, nothing of the previous params.yaml is merged in.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click
import yaml

from arca.io import write_text

CONF = Path(__file__).resolve().parents[1] / "conf"  # beside stages/, whatever the working directory
DEFAULT_PROFILE = "embedded"  # what `make repro` runs: params.yaml as committed


def profile_names(conf: Path = CONF) -> list[str]:
    return sorted(p.stem for p in (conf / "profile").glob("*.yaml"))


def composed_text(profile: str = DEFAULT_PROFILE, overrides: tuple[str, ...] = (), conf: Path = CONF) -> str:
    """params.yaml's text for `profile` plus Hydra `overrides` (`train.max_steps=2`, `~key`, `+key=...`), exactly
    as `dvc exp run -S profile=<profile> -S <override> ...` writes it."""
    from dvc.utils.hydra import compose_and_dump

    if profile not in profile_names(conf):
        names = ", ".join(profile_names(conf))
        raise click.BadParameter(f"unknown profile {profile!r}; one of {names} (conf/profile/<name>.yaml)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        # plugins_path: DVC passes the repo root; a folder without Hydra plugins loads none.
        compose_and_dump(out, str(conf.resolve()), None, "config", tmp, [f"profile={profile}", *overrides])
        return out.read_text()


def compose(profile: str = DEFAULT_PROFILE, overrides: tuple[str, ...] = (), conf: Path = CONF) -> dict[str, Any]:
    """The params of `profile` plus `overrides`, as the stages will read them."""
    return yaml.safe_load(composed_text(profile, overrides, conf))


@click.command()
@click.argument("profile", default=DEFAULT_PROFILE)
@click.option("-S", "--set-param", "overrides", multiple=True, help="Hydra override, as `dvc exp run -S`")
@click.option("--out", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="fail if --out differs from the composed profile (writes nothing)")
def main(profile: str, overrides: tuple[str, ...], out: str, check: bool) -> None:
    text = composed_text(profile, overrides)
    path = Path(out)
    if check:
        if not path.is_file() or path.read_text() != text:
            raise click.ClickException(
                f"{out} is not conf/profile/{profile}.yaml as DVC composes it; edit conf/, then `make params`"
            )
        click.echo(f"{out} = conf/profile/{profile}.yaml")
        return
    try:  # composition checks the file as every stage will: a bad key or cell fails here, in one line per key
        from stages.schema import validate

        validate(yaml.safe_load(text), f"conf/profile/{profile}.yaml")
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    write_text(path, text)
    click.echo(f"wrote {out} from conf/profile/{profile}.yaml; `dvc exp run -S profile={profile}` writes the same")


if __name__ == "__main__":
    main()
