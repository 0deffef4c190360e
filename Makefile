# Two commands on a fresh machine:  make demo  |  make test
# Each creates .venv if missing, installs the CPU build of torch when it is not importable,
# installs seismo with the extras it needs, then runs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: demo test lint test-slow test-all test-kernels setup-demo setup-test clean

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

# Lint (ruff) and the layer contracts (import-linter), then the default test suite.
lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PYTEST)

# The slow tests that back README and docs claims (demo diagnosis, edge-of-stability warning,
# the 100-point kill/resume test, ...). Run before every submission.
test-slow: setup-test
	$(PYTEST) -m slow

test-all: lint
	$(PYTEST) -m "slow or not slow"

# The default suite under each CPU kernel family this machine supports: tests about training
# effects must not depend on the floating-point kernels (a fresh machine may pick other ones).
test-kernels: setup-test
	@for cap in default avx2 $$(grep -q avx512f /proc/cpuinfo && echo avx512); do \
		echo "== ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap $(PYTEST) || exit 1; \
	done

clean:
	rm -rf $(VENV) runs .pytest_cache
