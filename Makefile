# Two commands on a fresh machine:  make demo  |  make test
# Each creates .venv if missing, installs the CPU build of torch when it is not importable,
# installs seismo with the extras it needs, then runs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: demo test test-fast lint test-slow test-all test-kernels setup-demo setup-test clean

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

# The slow tests behind the README's and the docs' claims that fit CI's budget (`make test` runs
# them after the default suite; CI runs .ci/run -> make test on a clean checkout): the demo's
# warning and diagnosis, the edge-of-stability warning, the Trainer's and Lightning's attention
# warning over seeds, the mitigations' effects over 5 seeds. About 4 min on 2 busy cores.
CI_SLOW := tests/diagnose/test_demo_diagnosis.py tests/diagnose/test_detectors_realrun.py \
	tests/integrations/test_huggingface.py tests/integrations/test_lightning.py \
	tests/mitigate/test_mitigation_effects.py

test: lint
	$(PYTEST)
	$(PYTEST) -m slow $(CI_SLOW)

# The default suite only (no slow test).
test-fast: lint
	$(PYTEST)

# Every slow test: those of `make test` and the rest (the 100-point kill/resume test, the 124M-GPT
# state bound, compiled attention, replay of the Pythia logs, autopsy in worker processes).
# Run before every submission: about 12 min on 2 busy cores (README, Tests).
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
