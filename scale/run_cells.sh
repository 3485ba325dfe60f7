#!/usr/bin/env bash
# One worker of a sweep: the given train cells, one after the other, in THIS clone, each pushed to the DVC remote
# (outputs and run-cache) as soon as it is done, so a gathering clone restores it without retraining.
#
#   scale/run_cells.sh uniform-r8-s0 arca-r8-s0      # run ids (keys of study.runs) or stage names train@<id>
#
# Per cell: `dvc repro --pull train@<id>` (base and prepare come from the remote's run-cache when another worker
# already pushed them, else they run here), then `dvc push --run-cache`. The clone needs a default DVC remote
# (committed in .dvc/config, or `dvc remote add --local -d shared <url>`), and the same commit as every other
# worker and the gatherer: params, code and dvc.yaml are part of each stage's run-cache key.
# Env: CELL_STAGES   stage templates run per cell (default "train"; "train dump" also dumps on the worker)
#      PUSH=0        do not push (one machine with a shared cache: scale/sweep_local.sh)
#      VENV          the virtual environment whose python and dvc the stages use (default: .venv of this clone)
set -euo pipefail

root=$(git rev-parse --show-toplevel)
cd "$root"
VENV=${VENV:-$root/.venv}
[ -x "$VENV/bin/dvc" ] || { echo "run_cells: no dvc in $VENV (make setup, or set VENV)" >&2; exit 2; }
export PATH="$VENV/bin:$PATH"  # dvc.yaml's commands call `python`
[ $# -gt 0 ] || { echo "usage: scale/run_cells.sh <run id>..." >&2; exit 2; }

pull=()
if [ "${PUSH:-1}" != 0 ]; then
    dvc remote default >/dev/null 2>&1 || { echo "run_cells: no default DVC remote in $root" >&2; exit 2; }
    pull=(--pull)
fi
for cell in "$@"; do
    cell=${cell#train@}
    targets=()
    for stage in ${CELL_STAGES:-train}; do targets+=("$stage@$cell"); done
    echo "run_cells: ${targets[*]} (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})"
    dvc repro "${pull[@]}" "${targets[@]}"
    if [ "${PUSH:-1}" != 0 ]; then
        dvc push --run-cache
    fi
done
