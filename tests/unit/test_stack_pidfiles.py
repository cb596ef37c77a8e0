"""The launcher stops only what it started: a pid file is trusted only with the right start time."""

from __future__ import annotations

import subprocess
from pathlib import Path

from infra.local.stack import Redis, StackSettings, _proc_start_time


def _settings(tmp_path: Path) -> StackSettings:
    return StackSettings(home=str(tmp_path))


def test_a_reused_pid_is_not_ours_and_is_never_signalled(tmp_path: Path) -> None:
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        server = Redis(_settings(tmp_path))
        server.pid_file.parent.mkdir(parents=True)
        # Same pid, but a start time that is not the stranger's: a pid reused after our server died.
        server.pid_file.write_text(f"{stranger.pid} 1\n")
        assert server.running_pid() is None
        assert server.stop(timeout=1) == "not running"
        assert stranger.poll() is None, "the launcher signalled a process it did not start"
        assert not server.pid_file.exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_our_own_process_is_recognised_and_stopped(tmp_path: Path) -> None:
    ours = subprocess.Popen(["sleep", "30"], start_new_session=True)
    server = Redis(_settings(tmp_path))
    server.pid_file.parent.mkdir(parents=True)
    server.pid_file.write_text(f"{ours.pid} {_proc_start_time(ours.pid)}\n")
    assert server.running_pid() == ours.pid
    assert server.stop(timeout=5) == "stopped"
    assert ours.wait(timeout=5) is not None


def test_garbage_pid_files_read_as_not_running(tmp_path: Path) -> None:
    server = Redis(_settings(tmp_path))
    server.pid_file.parent.mkdir(parents=True)
    server.pid_file.write_text("not a pid\n")
    assert server.running_pid() is None
