# mxgate — two commands matter: `make run` and `make test` (see README.md); `make demo` shows what it is for.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEB_PACKAGES := nsd unbound swaks postfix iproute2
# Binaries the tests use, one per Debian package above (same order).
DEB_PROBES   := /usr/sbin/nsd /usr/sbin/unbound /usr/bin/swaks /usr/sbin/smtp-sink /usr/bin/ss

.PHONY: run demo test lint typecheck unit integration soak bench deps venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,speed]'
	@touch $@

venv: $(STAMP)

# Debian packages the tests need; installed only when missing (CI runs as root on a fresh machine).
deps:
	@missing=""; set -- $(DEB_PROBES); for pkg in $(DEB_PACKAGES); do \
	  [ -x "$$1" ] || missing="$$missing $$pkg"; shift; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $$SUDO debconf-set-selections; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

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

test: $(STAMP) deps lint typecheck
	$(PY) -m pytest -q --durations=10

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP) deps
	$(PY) -m pytest -q -m integration

soak: $(STAMP) deps
	$(PY) -m pytest -q -m soak -o addopts=""

bench: $(STAMP) deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
