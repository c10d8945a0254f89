# mxgate — two commands matter: `make run` and `make test` (see README.md); `make demo` shows what it is for.
PYTHON ?= python3
# `make test PYTHON=python3.13` keeps its own virtual environment beside the default one.
VENV   := $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run demo test lint typecheck unit integration soak bench deps venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) 2>/dev/null || \
	  PYENV_VERSION="$$(pyenv versions --bare 2>/dev/null | grep -x '$(patsubst python%,%,$(PYTHON))\(\.[0-9]*\)*' | tail -1)" \
	  $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,speed,cluster]'
	@touch $@

venv: $(STAMP)

# Debian packages the tests need, installed only when a probe of what the tests use fails (scripts/deps.sh).
deps:
	@sh scripts/deps.sh

run: $(STAMP)
	$(VENV)/bin/mxgate run

# DANE, MTA-STS and TLS-RPT at work on loopback: DNS lab, SMTP sinks and a gateway, started and stopped.
demo: $(STAMP) deps
	$(VENV)/bin/mxgate demo

lint: $(STAMP)
	$(VENV)/bin/ruff check mxgate tests examples bench
	$(VENV)/bin/ruff format --check mxgate tests examples bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# pytest-xdist: one test process per core (each starts its own DNS lab, CA and PostgreSQL once); a test takes the
# next free process, so the long ones do not queue behind each other. `make unit` / `integration` run in one process.
test: $(STAMP) deps lint typecheck
	$(PY) -m pytest -q -n auto --dist worksteal --durations=10

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP) deps
	$(PY) -m pytest -q -m integration

soak: $(STAMP) deps
	$(PY) -m pytest -q -m soak -o addopts="" -o timeout=3600

bench: $(STAMP) deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
