# agentbus: one command for each job. Every target sets up what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STACK := $(PY) -m infra.local.stack
PYTEST_ARGS ?=

.PHONY: help setup up down status logs bootstrap lint test test-unit demo clean

help:
	@echo "make setup    install the Python environment, Redis, and the Kafka/Cassandra jars"
	@echo "make up       start Kafka, Cassandra, Redis, Triton (idempotent) and create topics/tables"
	@echo "make down     stop exactly the servers 'make up' started"
	@echo "make status   each server's port, pid, memory and health"
	@echo "make logs     the last lines of every server's log (SERVER=kafka for one)"
	@echo "make lint     ruff and mypy (strict on shared/ and services/)"
	@echo "make test     setup, up, lint, then the whole test suite against the real servers"
	@echo "make demo     (coming with the agent loop)"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,dev]'
	@touch $@

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing Debian's redis-server"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

setup: $(VENV)/.installed redis-server
	@command -v java >/dev/null || { echo "java (OpenJDK 17) is required"; exit 1; }
	@command -v mvn >/dev/null || { echo "mvn (Maven) is required"; exit 1; }

up: setup
	$(STACK) up
	$(MAKE) --no-print-directory bootstrap

bootstrap:
	$(PY) -m shared.topics create
	$(PY) -m shared.migrations apply

down:
	@test -x $(PY) && $(STACK) down || echo "nothing to stop (no environment)"

status:
	@$(STACK) status

logs:
	@$(STACK) logs $(SERVER)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check shared services tests infra/local
	$(VENV)/bin/mypy

test-unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test: up lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: up
	@echo "make demo: the scripted agent conversation comes with the agent-loop issue (#3)."
	@echo "The servers are up; 'make status' shows them, 'make down' stops them."

clean: down
	rm -rf .local
