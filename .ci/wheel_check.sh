#!/usr/bin/env bash
# The installable package: build the arca wheel, install it into a fresh venv with the newest versions that
# pyproject.toml allows (only torch pinned, to the release this machine has on disk, to skip a multi-GB CUDA
# download), and import the public API from outside the repo. Usage: bash .ci/wheel_check.sh (PYTHON=python3.x).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
torch_pin="${TORCH_PIN:-torch==2.13.0}"
work="$(mktemp -d /tmp/arca-wheel.XXXXXX)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# Build from a copy of what the wheel needs: setuptools writes build/ beside the sources.
mkdir "$work/src"
tar -C "$root" --exclude=__pycache__ -cf - pyproject.toml README.md arca | tar -C "$work/src" -xf -
"$python" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip wheel -q --no-deps -w "$work/dist" "$work/src" 2>&1 | { grep -v "is ignored" || true; }
wheel=$(ls "$work"/dist/arca-*.whl)
"$py" - "$wheel" <<'PY'
import sys, zipfile
tops = {name.split("/")[0] for name in zipfile.ZipFile(sys.argv[1]).namelist()}
assert all(t == "arca" or (t.startswith("arca-") and t.endswith(".dist-info")) for t in tops), tops
print("wheel contents:", sorted(tops))
PY

"$py" -m pip install -q "$wheel" "$torch_pin" 2>&1 | { grep -v "is ignored" || true; }
"$py" -m pip check
cd "$work"  # not the repo root: arca must come from the wheel
"$py" - <<'PY'
import importlib.metadata as md
import importlib.util

import trl

import arca
from arca import CreditGRPOConfig, CreditGRPOTrainer, compute_signals, effective_token_ratio, gini, math_reward, normalize
from arca.run.training import run_training  # every room imports from the wheel, not only the lazy surface

assert issubclass(CreditGRPOConfig, trl.GRPOConfig) and issubclass(CreditGRPOTrainer, trl.GRPOTrainer)
assert math_reward("\\boxed{2}", "2") == 1.0 and callable(run_training) and callable(normalize)
assert "site-packages" in arca.__file__, arca.__file__
assert importlib.util.find_spec("stages") is None and importlib.util.find_spec("bench") is None
# The token explorer's page is package data (explorer_page.html): a wheel without it fails here, not in a user's hands.
import pandas as pd
from arca.analysis.explorer import explorer_html
row = {"run": ["r"], "step": [0], "prompt_id": ["p"], "sample": [0], "pos": [0], "token": ["x"], "w_arca": [1.0]}
assert '"run":"r"' in explorer_html(pd.DataFrame(row))
print("installed:", ", ".join(f"{p} {md.version(p)}" for p in ("trl", "transformers", "peft", "accelerate", "torch",
                                                             "datasets", "math-verify", "numpy", "pandas")))
PY
# The console script `pip install .` puts beside the interpreter, from the wheel.
"$work/venv/bin/arca" inspect --help | grep -- "--adapter" > /dev/null  # not -q: an early exit would SIGPIPE under pipefail
echo "wheel check passed in $((SECONDS - start)) s"
