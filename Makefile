# Set-up in two commands:  `make demo` (run the main job)  and  `make test` (run the tests).
# Each creates the virtual environment on first use. torch 2.13.0 is installed first: on a
# CPU-only host it is the local CPU wheel; on a GPU host pip's default index gives a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test test-slow bench protos
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/geotrain demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

protos: install
	$(PY) protos/generate.py
