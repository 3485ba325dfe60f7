"""Stage `figures`: Lorenz curves, regime map, training curves, token heatmaps and the token explorer under
results/figures/, and the data of the DVC plots under results/plots/ (training curves, Lorenz curves,
degeneration map, faithfulness lift: dvc.yaml `plots:`, so `dvc plots diff main <exp>` overlays two revisions
where the PNGs only sit side by side).

Run from the repository root: `python -m stages.figures [--params params.yaml]`. Reads
`data/dumps/*.parquet`, `data/diagnostics/trajectories.parquet`, `data/runs/*/{log.tsv,budget.json}` and,
where present, `data/eval/*.json` and `data/faithfulness/<run>/{scores,effects}.parquet` (the lift figure, and
boxes on the decisive tokens of the heatmaps) and `data/degeneration/degeneration.parquet` (the degeneration
map, SPEC 10: Gini against KL(pi_c || pi_ref)). The token explorer (results/figures/explorer.html,
`arca.analysis.explorer`) shows every run x checkpoint x probe completion of the dumps, with the problem text and
reference answer of data/prepared/probe.parquet and the decisive tokens of every faithfulness run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import click
import pandas as pd
import pyarrow.parquet as pq

from arca.analysis.degeneration_report import degeneration_figure, degeneration_plot_table
from arca.analysis.explorer import write_explorer
from arca.analysis.faithfulness_figure import faithfulness_figure, faithfulness_plot_table
from arca.analysis.figures import atomic_write, lorenz_figure, lorenz_table, regime_map, training_curves
from arca.analysis.heatmap import heatmap_pages, heatmap_png
from stages.common import load_valid

log = logging.getLogger(__name__)

DUMPS = Path("data/dumps")
TRAJECTORIES = Path("data/diagnostics/trajectories.parquet")
RUNS = Path("data/runs")
EVALS = Path("data/eval")
FAITHFULNESS = Path("data/faithfulness")  # <run>/scores.parquet, <run>/effects.parquet (SPEC 9)
DEGENERATION = Path("data/degeneration/degeneration.parquet")  # the degeneration map (SPEC 10)
PROBES = Path("data/prepared/probe.parquet")  # problem text and reference answer of every probe prompt
FIGURES = Path("results/figures")
PLOTS = Path("results/plots")
# Columns the Lorenz curves need from every dump; the heatmap run is read in full.
_LORENZ_KEYS = ["run", "method", "rank", "step", "prompt_id", "sample"]
# What the explorer shows of every dump: keys, tokens, reward, advantage, raw saliences and weights (not a32_).
_EXPLORER_KEYS = ["run", "method", "step", "prompt_id", "sample", "pos", "token_id", "token", "reward", "advantage"]


@dataclass(frozen=True)
class FigureParams:
    """The params this stage reads (params.yaml `diagnostics` and `figures`)."""

    etr_uniform: float
    etr_concentrated: float
    heatmap_prompts: int
    heatmap_run: str | None
    seed: int
    lorenz_by: str = "phase"


def _number(section: dict, name: str, key: str) -> float:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"params.yaml: {name}.{key} must be a number, got {value!r}")
    return float(value)


def _int(section: dict, name: str, key: str, minimum: int) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"params.yaml: {name}.{key} must be an int >= {minimum}, got {value!r}")
    return value


def parse_params(params: dict) -> FigureParams:
    """Validate the `diagnostics` and `figures` sections; errors (TypeError/ValueError) name the key."""
    for name in ("diagnostics", "figures"):
        if not isinstance(params.get(name), dict):
            raise TypeError(f"params.yaml: section `{name}` is missing or not a mapping")
    diag, fig = params["diagnostics"], params["figures"]
    etr_uniform = _number(diag, "diagnostics", "etr_uniform")
    etr_concentrated = _number(diag, "diagnostics", "etr_concentrated")
    if not 0.0 <= etr_concentrated < etr_uniform <= 1.0:
        raise ValueError(
            "params.yaml: need 0 <= diagnostics.etr_concentrated < diagnostics.etr_uniform <= 1, "
            f"got {etr_concentrated} and {etr_uniform}"
        )
    run = fig.get("heatmap_run")
    if run is not None and not isinstance(run, str):
        raise ValueError(f"params.yaml: figures.heatmap_run must be a run id or null, got {run!r}")
    lorenz_by = fig.get("lorenz_by", "phase")
    if lorenz_by not in ("phase", "rank"):
        raise ValueError(f"params.yaml: figures.lorenz_by must be 'phase' or 'rank', got {lorenz_by!r}")
    return FigureParams(
        etr_uniform,
        etr_concentrated,
        _int(fig, "figures", "heatmap_prompts", 1),
        run,
        _int(fig, "figures", "seed", 0),
        lorenz_by,
    )


def write_plot(name: str, table: pd.DataFrame) -> None:
    """results/plots/<name>.csv: the data of a `dvc plots` entry (dvc.yaml `plots:`), so `dvc plots diff` overlays
    experiments; header only where the stage has nothing to draw (the output must exist)."""
    write = lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")  # noqa: E731
    atomic_write(PLOTS / f"{name}.csv", write)


def _dump_paths() -> list[Path]:
    paths = sorted(DUMPS.glob("*.parquet"))
    if not paths:
        raise click.ClickException(f"no token dumps found in {DUMPS}/ (expected <run>.parquet per run)")
    return paths


def read_lorenz_columns(paths: list[Path]) -> pd.DataFrame:
    """Keys and normalized weights of every dump (raw saliences and token text left on disk)."""
    frames = []
    for path in paths:
        names = pq.read_schema(path).names
        frames.append(pd.read_parquet(path, columns=_LORENZ_KEYS + [n for n in names if n.startswith("w_")]))
    return pd.concat(frames, ignore_index=True)


def pick_heatmap_run(dumps: pd.DataFrame, wanted: str | None) -> str:
    """`wanted` if given, else the first ARCA run (sorted by id), else the first run."""
    if wanted is not None:
        return wanted
    methods = dumps[["run", "method"]].drop_duplicates().sort_values("run")
    arca = methods[methods["method"] == "arca"]
    return str((arca if len(arca) else methods)["run"].iloc[0])


def explorer_page(paths: list[Path], out: Path) -> Path:
    """The token explorer over every dump, with the probe problems and every faithfulness run's effects."""
    frames = []
    for path in paths:
        names = pq.read_schema(path).names
        frames.append(pd.read_parquet(path, columns=_EXPLORER_KEYS + [n for n in names if n[:2] in ("a_", "w_")]))
    effects = [pd.read_parquet(p) for p in sorted(FAITHFULNESS.glob("*/effects.parquet"))]
    problems = pd.read_parquet(PROBES, columns=["prompt_id", "problem", "answer"]) if PROBES.is_file() else None
    return write_explorer(
        out,
        pd.concat(frames, ignore_index=True),
        effects=pd.concat(effects, ignore_index=True) if effects else None,
        problems=problems,
        title="ARCA token explorer: every run, checkpoint and probe completion",
    )


def read_logs() -> pd.DataFrame:
    """Every run's log.tsv, tagged with run id and the method, rank and seed of its budget.json."""
    frames = []
    for log_path in sorted(RUNS.glob("*/log.tsv")):
        budget = json.loads((log_path.parent / "budget.json").read_text())
        frame = pd.read_csv(log_path, sep="\t")
        frames.append(
            frame.assign(run=log_path.parent.name, method=budget["method"], rank=budget["rank"], seed=budget["seed"])
        )
    if not frames:
        raise click.ClickException(f"no training logs found at {RUNS}/<run>/log.tsv")
    return pd.concat(frames, ignore_index=True)


def read_evals() -> pd.DataFrame | None:
    """Held-out evaluation summaries (`run, pass@1`), None when no run has one yet."""
    rows = [json.loads(p.read_text()) for p in sorted(EVALS.glob("*.json"))]
    rows = [r for r in rows if "run" in r and "pass@1" in r]
    return pd.DataFrame(rows)[["run", "pass@1"]] if rows else None


@click.command()
@click.option(
    "--params",
    "params_path",
    default="params.yaml",
    show_default=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
def main(params_path: Path) -> None:
    """Draw every figure of the pipeline into results/figures/ and the plots table into results/plots/."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raw = load_valid(params_path)[0]  # the whole file first, before any figure input is read
    try:
        params = parse_params(raw)
    except (TypeError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    if not TRAJECTORIES.is_file():
        raise click.ClickException(f"missing {TRAJECTORIES} (run the diagnostics stage first)")
    paths = _dump_paths()
    dumps = read_lorenz_columns(paths)
    traj = pd.read_parquet(TRAJECTORIES)
    phases = traj[["run", "step", "phase"]].drop_duplicates()
    lorenz_figure(dumps, FIGURES / "lorenz.png", by=params.lorenz_by, phases=phases)
    write_plot("lorenz", lorenz_table(dumps, by=params.lorenz_by, phases=phases))
    regime_map(traj, FIGURES / "regime_map.png", params.etr_uniform, params.etr_concentrated, seed=params.seed)
    training_curves(read_logs(), FIGURES / "training_curves.png", PLOTS / "training_curves.csv", read_evals())
    scores = sorted(FAITHFULNESS.glob("*/scores.parquet"))
    faithfulness = pd.concat(map(pd.read_parquet, scores), ignore_index=True) if scores else None
    if faithfulness is not None:  # every profile lists at least one run in faithfulness.runs; a figure where one ran
        faithfulness_figure(faithfulness, FIGURES / "faithfulness.png")
    degeneration = pd.read_parquet(DEGENERATION) if DEGENERATION.is_file() else None
    if degeneration is not None:  # SPEC 10: Gini against KL(pi_c || pi_ref), one panel per run
        degeneration_figure(degeneration, FIGURES / "degeneration.png")
    write_plot("faithfulness", faithfulness_plot_table(faithfulness))
    write_plot("degeneration", degeneration_plot_table(degeneration))

    run = pick_heatmap_run(dumps, params.heatmap_run)
    run_paths = [p for p in paths if p.stem == run]
    if not run_paths:
        raise click.ClickException(
            f"figures.heatmap_run: no dump {DUMPS}/{run}.parquet; have {[p.stem for p in paths]}"
        )
    run_dump = pd.read_parquet(run_paths[0])
    effects_path = FAITHFULNESS / run / "effects.parquet"
    effects = pd.read_parquet(effects_path) if effects_path.is_file() else None  # boxes the decisive tokens
    pages = heatmap_pages(
        run_dump, FIGURES / "heatmaps", run, max_prompts=params.heatmap_prompts, seed=params.seed, effects=effects
    )
    heatmap_png(run_dump, FIGURES / "heatmaps.png", run, max_prompts=params.heatmap_prompts, seed=params.seed)
    explorer = explorer_page(paths, FIGURES / "explorer.html")
    log.info(
        "wrote figures for %d runs, %d heatmap pages of run %s, %s (%.0f kB)",
        dumps["run"].nunique(),
        len(pages),
        run,
        explorer,
        explorer.stat().st_size / 1e3,
    )


if __name__ == "__main__":
    main()
