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

.PHONY: demo test clean
demo: $(VENV)/.installed
	$(VENV)/bin/nanoseek demo

test: $(VENV)/.installed
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
