# The project's verbs. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NATS_SERVER_BIN ?= $(shell command -v nats-server 2>/dev/null || ls /usr/sbin/nats-server 2>/dev/null)
export NATS_SERVER_BIN

.PHONY: help setup nats-server run run-accounts test lint bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

setup: $(STAMP) nats-server ## venv, Python packages and nats-server

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

nats-server: ## install nats-server (Debian package) when it is missing
	@if [ -n "$(NATS_SERVER_BIN)" ] && [ -x "$(NATS_SERVER_BIN)" ]; then exit 0; fi; \
	if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing nats-server (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null; \
	else \
		echo "nats-server (>= 2.9) is required: 'sudo apt-get install nats-server', or set NATS_SERVER_BIN=/path/to/nats-server" >&2; \
		exit 1; \
	fi

run: setup ## local NATS with JetStream + service + sidecar, with a development token
	$(PY) -m service.devstack

run-accounts: setup ## the same stack in accounts (operator) mode
	$(PY) -m service.accounts.devstack

test: setup ## the full test suite (starts its own nats-server on a random port)
	$(PY) -m pytest

lint: setup ## ruff and mypy
	$(VENV)/bin/ruff check service schemas tests bench
	$(VENV)/bin/ruff format --check service schemas tests bench
	$(VENV)/bin/mypy

bench: setup ## benchmarks against raw NATS baselines; writes bench/RESULTS.md
	$(PY) -m bench

clean: ## remove the venv and local data
	rm -rf $(VENV) data .pytest_cache
