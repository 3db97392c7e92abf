# The two commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch, pinned only where no torch is installed yet (a bare `torch` pulls a CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint venv clean

$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.stamp

demo: $(VENV)/.stamp
	$(PY) -m thinkforge run recipes/tiny.yaml --out runs/demo

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check .

test: $(VENV)/.stamp lint
	$(PY) -m pytest -q -x --durations=10

clean:
	rm -rf runs .pytest_cache .ruff_cache
