# The two commands the README promises: `make demo` and `make test`.
# torch is pinned here and nowhere else: override with `make TORCH=torch==X.Y.Z ...`.
# An unpinned torch from PyPI is a CUDA build of several GB; 2.13.0 is the CPU build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst =,_,$(TORCH))

.PHONY: venv demo test lint typecheck pytest unit completions protos bench-archive clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" examples/resnet_faces/run_demo.sh

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

# the fast unit tests alone (no processes, no sockets): a few seconds
unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

# Shell completion scripts, generated from the CLI; tests/e2e/test_completions.py fails when stale.
completions: $(STAMP)
	_TSCTL_COMPLETE=source_bash $(BIN)/tsctl > completions/tsctl.bash
	_TSCTL_COMPLETE=source_zsh $(BIN)/tsctl > completions/_tsctl
	_TSCTL_COMPLETE=source_fish $(BIN)/tsctl > completions/tsctl.fish

# gRPC code from proto/ into tsctl/proto_gen/; tests/e2e/test_protos.py fails when it is stale.
protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

bench-archive: $(STAMP)
	$(BIN)/python benchmarks/archive_memory.py

clean:
	rm -rf $(VENV) .ruff_cache .mypy_cache .pytest_cache
