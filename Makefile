# Set-up and the two entry points: `make demo` (the main job) and `make test`.
# The virtual environment is made once and refreshed when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The dev machines carry a CPU build of this release on local disk. Elsewhere,
# override it: `make test TORCH='torch>=2.13' TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'`.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick lint bench clean gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/torchslim demo

test: lint
	$(PY) -m pytest

# For development: everything but the tests marked slow (those that start processes); ~30 s.
test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check torchslim tests bench
	$(VENV)/bin/mypy

# Each prints a table and a last JSON line; they take a few minutes in all.
bench: $(STAMP)
	for b in loop_overhead summaries_overhead eval_throughput prefetch_overlap analyze_speed ddp_scaling validation_overhead checkpoint_io; do \
		$(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) runs

# The tests marked `cuda` and bench/step_speed.py on CUDA; skips cleanly without a GPU.
gpu-check: $(STAMP)
	PY=$(PY) bench/gpu_check.sh
