# pytest-gradcheck developer commands. Quick start: `make demo`, then `make test`.
#
# Every pip install goes through constraints.txt: it pins torch (an unpinned torch pulls
# several GB of CUDA wheels) and the test and lint tools, so CI and developers get the same set.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_INSTALL := $(PIP) install -c constraints.txt

# Arguments of the demo gate over examples/ and of the test suite.
DEMO_ARGS ?= -rP
TEST_ARGS ?= -n 2

# Validates .github/workflows/*.yml against its built-in (vendored, offline) schema.
# 0.38.2: the newest release that still installs on Python 3.10 (0.39 needs 3.11).
CHECK_JSONSCHEMA_VERSION := 0.38.2

# Two CPU cores on CI: one torch thread per process (tests/conftest.py pins it too).
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

.DEFAULT_GOAL := help
.PHONY: help install install-dev demo test lint bench clean distclean

help:
	@echo "make demo      set up $(VENV), run the demo gate: pytest examples $(DEMO_ARGS)"
	@echo "make test      set up $(VENV), run the test suite: pytest $(TEST_ARGS)"
	@echo "make lint      ruff check, ruff format --check, mypy, workflow and action checks"
	@echo "make bench     run benchmarks/run.py"
	@echo "make clean     remove caches and build outputs (distclean also removes $(VENV))"
	@echo "Variables: PYTHON=$(PYTHON) VENV=$(VENV) DEMO_ARGS='$(DEMO_ARGS)' TEST_ARGS='$(TEST_ARGS)'"

# Stamp files: pip runs again only when pyproject.toml or constraints.txt (or, for the dev
# tools, this Makefile) change; repeated make calls reuse the venv.
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; \
	  exit 1; }
	$(PIP_INSTALL) -e '.[test]'
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed Makefile
	$(PIP_INSTALL) -e '.[dev]' 'check-jsonschema==$(CHECK_JSONSCHEMA_VERSION)'
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# pytest exits 5 when it collected no tests: say so, and keep the non-zero status.
define run_pytest
	$(PY) -m pytest $(1) || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit 5)" >&2; fi; \
	  exit $$rc; }
endef

demo: $(VENV)/.installed
	$(call run_pytest,examples $(DEMO_ARGS))

test: $(VENV)/.installed
	$(call run_pytest,$(TEST_ARGS))

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-actions action.yml
	$(VENV)/bin/actionlint  # also checks the inputs given to ./action.yml and the reusable workflow

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
