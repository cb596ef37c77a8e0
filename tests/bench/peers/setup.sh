#!/usr/bin/env bash
# Installs what the benchmark peers need; idempotent (make bench runs it every time).
#   1. the project's venv with the `bench` extra (LangGraph + Postgres checkpointer, psycopg,
#      restate-sdk, Hypercorn, matplotlib), pinned in pyproject.toml;
#   2. restate-server from npm (@restatedev/restate-server, pinned below) into .local/bench;
#   3. Debian's PostgreSQL server, when no /usr/lib/postgresql/<v>/bin/initdb is there.
# Environment: VENV (default .venv), PYTHON (to create the venv, default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$ROOT"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
BENCH_DIR=.local/bench
RESTATE_SERVER_VERSION=1.7.12 # keep in step with tests/bench/peers/restate_peer.py

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi

# 1. Python packages: reinstalled only when pyproject.toml changes.
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.bench-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "bench: pip install -e '.[bench]'"
  "$VENV/bin/python" -m pip install -q -e '.[bench]'
  echo "$want" >"$stamp"
fi

# 2. restate-server: npm installs the binary of this platform as an optional dependency.
restate_bin() { ls "$BENCH_DIR"/node_modules/@restatedev/restate-server-*/bin/restate-server 2>/dev/null | head -n1; }
bin="$(restate_bin || true)"
if [ -z "$bin" ] || [ "$("$bin" --version 2>/dev/null)" != "restate-server $RESTATE_SERVER_VERSION" ]; then
  command -v npm >/dev/null || { echo "bench: npm is required to install restate-server" >&2; exit 1; }
  echo "bench: npm install @restatedev/restate-server@$RESTATE_SERVER_VERSION into $BENCH_DIR"
  mkdir -p "$BENCH_DIR"
  npm install --prefix "$BENCH_DIR" --save-exact --no-audit --no-fund --loglevel=error \
    "@restatedev/restate-server@$RESTATE_SERVER_VERSION" >/dev/null
  bin="$(restate_bin || true)"
  [ -n "$bin" ] || { echo "bench: npm installed no restate-server binary for this platform" >&2; exit 1; }
fi

# 3. PostgreSQL (Debian's package; the bench runs its own throwaway cluster, not the system one).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  echo "bench: installing Debian's postgresql"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi

echo "bench: peers ready ($("$bin" --version), $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n1 || command -v initdb))"
