# agentbus: one command for each job. Every target sets up what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STACK := $(PY) -m infra.local.stack
SERVICES := $(PY) -m infra.local.services
REPLICAS ?= 2
DEMO_TENANT ?= demo
DEMO_SECRET ?= demo-local-secret
DEMO_TENANTS := $(CURDIR)/.local/demo-tenants.json
PYTEST_ARGS ?=

.PHONY: help setup up down status logs bootstrap lint test test-unit triton-up demo demo-tenants services-up services-down chaos clean

help:
	@echo "make setup    install the Python environment, Redis, and the Kafka/Cassandra jars"
	@echo "make up       start Kafka, Cassandra, Redis, Triton (idempotent) and create topics/tables"
	@echo "make down     stop exactly the servers 'make up' started"
	@echo "make status   each server's port, pid, memory and health"
	@echo "make logs     the last lines of every server's log (SERVER=kafka for one)"
	@echo "make lint     ruff and mypy (strict on shared/ and services/)"
	@echo "make test     setup, up, lint, then the whole test suite against the real servers"
	@echo "make chaos    the chaos suite: kills, restarts, wipes, poison, replay; verifies effectively-once"
	@echo "make demo     up, 2 replicas of every service, a scripted conversation, services down"
	@echo "make services-up    REPLICAS (default 2) of each service as local processes (after make up)"
	@echo "make services-down  stop exactly the service replicas services-up started"

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
	$(VENV)/bin/ruff format --check shared services tests infra/local agentctl scripts
	$(VENV)/bin/mypy

test-unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

# AGENTBUS_TESTCONTAINERS=1 make test: Kafka, Cassandra and Redis come from testcontainers
# (tests/integration/containers.py, needs a Docker engine); only Triton is started locally.
ifeq ($(AGENTBUS_TESTCONTAINERS),1)
TEST_SERVERS := triton-up
else
TEST_SERVERS := up
endif

triton-up: setup
	$(STACK) up triton

test: $(TEST_SERVERS) lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The demo tenant's secret goes to ingress (a secrets file) and to the demo client. The
# services are always stopped afterwards (trap); the servers stay up: `make down` stops them.
demo-tenants:
	@mkdir -p $(dir $(DEMO_TENANTS))
	@umask 077 && printf '{"%s": "%s"}\n' '$(DEMO_TENANT)' '$(DEMO_SECRET)' > $(DEMO_TENANTS)

demo: up demo-tenants
	@export AGENTBUS_TENANT_SECRETS_FILE='$(DEMO_TENANTS)' AGENTBUS_TENANT='$(DEMO_TENANT)' \
	        AGENTBUS_TENANT_SECRET='$(DEMO_SECRET)'; \
	trap '$(SERVICES) down; echo "The servers are still up: make status shows them, make down stops them."' EXIT; \
	$(SERVICES) up --replicas $(REPLICAS) && $(PY) scripts/demo.py

services-up: up demo-tenants
	AGENTBUS_TENANT_SECRETS_FILE="$${AGENTBUS_TENANT_SECRETS_FILE:-$(DEMO_TENANTS)}" \
	  $(SERVICES) up --replicas $(REPLICAS)

services-down:
	@test -x $(PY) && $(SERVICES) down || echo "nothing to stop (no environment)"

# The full chaos run (tests/chaos): 1,000 sessions x 5 turns under every fault, then the verifier.
# CHAOS_ARGS='--scenario smoke' for a quick one; results go to docs/RELIABILITY.md.
chaos: up
	PYTHONPATH=$(CURDIR) $(PY) -m tests.chaos.run_chaos $(CHAOS_ARGS)

# The benchmark (tests/bench): installs the peers (LangGraph + PostgreSQL, Restate), runs every
# scenario, writes docs/bench/ and the README's table. BENCH_ARGS='--quick' for a short run.
bench: up
	bash tests/bench/peers/setup.sh
	PYTHONPATH=$(CURDIR) $(PY) -m tests.bench.run_bench $(BENCH_ARGS)

# The bounded chaos run on its own (make test runs it too).
chaos-smoke: up
	$(VENV)/bin/pytest tests/integration/test_chaos_smoke.py

clean: down
	rm -rf .local
