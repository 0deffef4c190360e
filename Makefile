# Two commands on a fresh machine:  make demo  |  make test
# Each creates .venv if missing, installs the CPU build of torch when it is not importable,
# installs seismo with the extras it needs, then runs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0

.PHONY: demo test test-all setup-demo setup-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	@touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[plot]"
	@touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[dev]"
	@touch $@

setup-demo: $(VENV)/.demo
setup-test: $(VENV)/.test

demo: setup-demo
	$(VENV)/bin/seismo demo

test: setup-test
	$(PY) -m pytest -q

test-all: setup-test
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
