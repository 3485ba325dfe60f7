#!/usr/bin/env bash
# The sweep on the GPUs of one machine: every train cell (stage train@<run id>, one per key of study.runs) on its
# own GPU, as many at once as there are GPUs, then the rest of the pipeline once in this workspace.
#
#   scale/sweep_local.sh                     # all cells, one GPU each, the GPUs nvidia-smi lists
#   NGPUS=4 scale/sweep_local.sh             # GPUs 0-3 (= GPUS="0 1 2 3")
#   GPUS="0 1 2 3" scale/sweep_local.sh      # these GPUs; GPUS="0,1 2,3": two GPUs per cell, for a launcher
#                                            # running 2 processes (train.launcher / train.num_processes 2)
#   scale/sweep_local.sh kl-r8-s0 arca-r8-s0 # only these cells
#
# DVC holds one lock per workspace, so cells cannot run as parallel `dvc repro` in this one. Each cell runs in its
# own git worktree under $SWEEP_DIR (default .dvc/tmp/sweep, ignored by git and DVC) checked out at this
# workspace's state (`git stash create`: HEAD plus uncommitted changes to tracked files), sharing this workspace's
# DVC cache, with CUDA_VISIBLE_DEVICES set to its GPU group. base and prepare run here first, once; each worktree
# restores them from the shared run-cache, trains its cell, and DVC stores the run in the shared run-cache. Then
# scale/gather.sh here restores every cell from that run-cache (refusing to retrain any) and runs dump, diagnose,
# evaluate, tables and figures once, with this workspace's dvc.lock and git revision as the lineage.
# A failed cell leaves its worktree (and the trainer's checkpoints in it): rerunning the script resumes it.
# Env: GPUS or NGPUS, SWEEP_DIR, PRE_STAGES (default "base prepare": what the train cells depend on),
#      CELL_STAGES (default "train"), KEEP=1 (keep worktrees), VENV (.venv),
#      GATHER   1: gather everything (default); cells: restore only this sweep's cells here; 0: no gather
#      GATHER_TARGETS  with GATHER=1, what the final `dvc repro` builds (default everything, e.g. "tables")
#      PUSH=1   then `dvc push --run-cache` (this machine is one of several: see scale/README.md)
set -euo pipefail

root=$(git rev-parse --show-toplevel)
cd "$root"
VENV=${VENV:-$root/.venv}
[ -x "$VENV/bin/dvc" ] || { echo "sweep_local: no dvc in $VENV (make setup, or set VENV)" >&2; exit 2; }
export PATH="$VENV/bin:$PATH"
SWEEP_DIR=${SWEEP_DIR:-$root/.dvc/tmp/sweep}
command -v flock >/dev/null || { echo "sweep_local: needs flock (util-linux)" >&2; exit 2; }
if [ "${PUSH:-0}" = 1 ] && [ "${GATHER:-1}" = 0 ]; then
    echo "sweep_local: PUSH=1 needs a gather (GATHER=cells at least): dvc push sends what dvc.lock names" >&2
    exit 2
fi

if [ -z "${GPUS+x}" ]; then
    n=${NGPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
    [ "$n" -gt 0 ] || { echo "sweep_local: no GPU found by nvidia-smi; set GPUS (e.g. GPUS=\"0 1\")" >&2; exit 2; }
    GPUS=$(seq -s ' ' 0 $((n - 1)))
fi
read -ra slots <<<"$GPUS"
[ ${#slots[@]} -gt 0 ] || { echo "sweep_local: GPUS is empty" >&2; exit 2; }

if [ $# -gt 0 ]; then
    cells=("${@#train@}")
else
    mapfile -t cells < <(dvc stage list --name-only | sed -n 's/^train@//p')
fi
[ ${#cells[@]} -gt 0 ] || { echo "sweep_local: no train cell" >&2; exit 2; }

# Untracked code or params would be missing from the worktrees and change every cell's run-cache key.
untracked=$(git ls-files --others --exclude-standard -- arca stages dvc.yaml params.yaml)
if [ -n "$untracked" ]; then
    echo "sweep_local: untracked files the cells depend on (git add them): ${untracked//$'\n'/ }" >&2
    exit 2
fi
rev=$(git -c user.name=sweep -c user.email=sweep@localhost stash create)
rev=${rev:-$(git rev-parse HEAD)}
cache=$(dvc cache dir)

echo "sweep_local: ${#cells[@]} cells on ${#slots[@]} GPU groups (${slots[*]}), worktrees in $SWEEP_DIR"
read -ra pre <<<"${PRE_STAGES:-base prepare}"
dvc repro "${pre[@]}"

mkdir -p "$SWEEP_DIR/wt" "$SWEEP_DIR/logs"
for cell in "${cells[@]}"; do  # serially: git worktree add takes locks of this repository
    wt="$SWEEP_DIR/wt/$cell"
    if [ -e "$wt/.git" ]; then
        git -C "$wt" checkout -q --force --detach "$rev"  # keeps ignored files: DVC outputs, checkpoints
    else
        git worktree add -q --force --detach "$wt" "$rev"
    fi
    (cd "$wt" && dvc cache dir --local "$cache" && dvc config --local cache.type reflink,hardlink,copy)
done

queue="$SWEEP_DIR/queue"
printf '%s\n' "${cells[@]}" >"$queue"
pop() {  # the next cell of the queue, or status 1 when it is empty
    # shellcheck disable=SC2016  # $1 and $c belong to the inner sh
    flock "$queue.lock" sh -c 'c=$(head -n 1 "$1"); [ -n "$c" ] || exit 1; sed -i 1d "$1"; echo "$c"' sh "$queue"
}
slot() {  # $1 = GPU group: cells off the queue until it is empty
    local cell status=0
    while cell=$(pop); do
        echo "sweep_local: train@$cell on CUDA_VISIBLE_DEVICES=$1 (log $SWEEP_DIR/logs/$cell.log)"
        if (cd "$SWEEP_DIR/wt/$cell" && CUDA_VISIBLE_DEVICES=$1 VENV=$VENV PUSH=0 \
            bash "$root/scale/run_cells.sh" "$cell") >"$SWEEP_DIR/logs/$cell.log" 2>&1; then
            echo "sweep_local: train@$cell done"
        else
            echo "sweep_local: train@$cell FAILED, see $SWEEP_DIR/logs/$cell.log" >&2
            echo "$cell" >>"$SWEEP_DIR/failed"
            status=1
        fi
    done
    return $status
}

rm -f "$SWEEP_DIR/failed"
pids=()
for gpus in "${slots[@]}"; do
    slot "$gpus" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
if [ -s "$SWEEP_DIR/failed" ]; then
    echo "sweep_local: failed cells (worktrees kept; rerun to resume): $(tr '\n' ' ' <"$SWEEP_DIR/failed")" >&2
    exit 1
fi

if [ "${KEEP:-0}" != 1 ]; then
    for cell in "${cells[@]}"; do git worktree remove --force "$SWEEP_DIR/wt/$cell"; done
fi
case ${GATHER:-1} in
    0) ;;
    cells) bash "$root/scale/gather.sh" "${cells[@]/#/train@}" ;;
    *) read -ra targets <<<"${GATHER_TARGETS:-}"; bash "$root/scale/gather.sh" "${targets[@]}" ;;
esac
if [ "${PUSH:-0}" = 1 ]; then  # what this workspace's dvc.lock names (the restored cells) and the run-cache
    dvc push --run-cache
fi
