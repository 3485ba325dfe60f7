#!/usr/bin/env bash
# Gather a sweep in THIS clone: every train cell restored from DVC's run-cache (none retrained), then the rest of the
# pipeline (dump, diagnose, evaluate, tables, figures) once, so dvc.lock and the tables' lineage are this clone's.
#
#   scale/gather.sh                  # = dvc repro --pull, refusing to train
#   ALLOW_TRAIN=1 scale/gather.sh    # a cell without a run-cache entry is trained here instead of failing
#
# With a default DVC remote, `--pull` fetches the run-cache and the objects of the restored stages (a plain
# `dvc pull --run-cache && dvc repro` does not: `dvc pull` fetches only what this clone's dvc.lock names, so
# `dvc repro` finds the run-cache entries but not their outputs, and retrains). Without a remote (one machine,
# shared cache: scale/sweep_local.sh) it is a plain `dvc repro`.
# The guard: a first pass reproduces only the train cells with `python`, `accelerate`, `torchrun` and `deepspeed`
# wrapped so that a command running `stages.train` fails; a cell that would retrain (no entry: another commit,
# other params, a worker that never pushed) stops the gather with its name before anything trains.
# Extra arguments go to the final `dvc repro` (e.g. `tables` to stop there); train@<id> stages alone restore
# just those cells (a machine gathering the cells it trained, to push them: scale/sweep_local.sh PUSH=1).
set -euo pipefail

root=$(git rev-parse --show-toplevel)
cd "$root"
VENV=${VENV:-$root/.venv}
[ -x "$VENV/bin/dvc" ] || { echo "gather: no dvc in $VENV (make setup, or set VENV)" >&2; exit 2; }
export PATH="$VENV/bin:$PATH"

pull=()
if dvc remote default >/dev/null 2>&1; then pull=(--pull); fi
if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qv '^train@'; then
    cells=("$@")  # asked for train cells only: restore just those
else
    mapfile -t cells < <(dvc stage list --name-only | grep '^train@' || true)
fi
[ ${#cells[@]} -gt 0 ] || { echo "gather: dvc.yaml has no train@ stage" >&2; exit 2; }

if [ "${ALLOW_TRAIN:-0}" != 1 ]; then
    shim=$(mktemp -d)
    trap 'rm -rf "$shim"' EXIT
    for exe in python python3 accelerate torchrun deepspeed; do
        real=$(command -v "$exe" || true)
        [ -n "$real" ] || continue
        cat >"$shim/$exe" <<EOF
#!/usr/bin/env bash
for arg in "\$@"; do
    if [ "\$arg" = stages.train ]; then
        echo "gather: refusing to train (\$*): this cell has no run-cache entry for this commit and params;" \\
             "run it on a worker (scale/run_cells.sh), or ALLOW_TRAIN=1 scale/gather.sh" >&2
        exit 3
    fi
done
exec "$real" "\$@"
EOF
        chmod +x "$shim/$exe"
    done
    echo "gather: restoring ${#cells[@]} train cells from the run-cache"
    PATH="$shim:$PATH" dvc repro "${pull[@]}" "${cells[@]}"
fi
dvc repro "${pull[@]}" "$@"
