"""The launcher's view of the running servers (`make status`)."""

from __future__ import annotations

import subprocess
import sys


def test_status_shows_every_server_ready_with_port_and_pid() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "infra.local.stack", "status"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert set(lines) == {"kafka", "cassandra", "redis", "triton"}
    for name, cols in lines.items():
        assert cols[-1] == "ready", f"{name}: {cols}"
        assert cols[1].isdigit() and cols[2].isdigit()


def test_up_is_idempotent_and_quick_when_everything_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "infra.local.stack", "up"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("already running") == 4
    assert "all servers ready" in out.stdout
