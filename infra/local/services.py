"""Run N replicas of each agentbus service as local processes (the servers come from ``stack.py``).

    python -m infra.local.services up [--replicas 2] [SERVICE...]   # start, wait for /readyz
    python -m infra.local.services down [SERVICE...]                # SIGTERM, SIGKILL after 40 s
    python -m infra.local.services status
    python -m infra.local.services logs [SERVICE...] [-n LINES]
    python -m infra.local.services kill [--signal KILL] SERVICE N   # chaos: signal one replica

Services: ingress, reasoning, tool-exec, checkpoint. Replica ``n`` (from 1) of the service
at index ``i`` runs ``python -m services.<module>`` with the current environment plus
``AGENTBUS_HTTP_PORT = base + 10*i + n`` (base 8100, ``AGENTBUS_SERVICES_BASE_PORT``), so
``AGENTBUS_TOPIC_PREFIX`` and every other setting flow through. Like the servers, every
replica leads its own process group, its pid file (``.local/run/svc-<name>-<n>.pid``)
records the kernel start time, and ``down``/``kill`` signal exactly those processes,
never by name. Logs: ``.local/logs/svc-<name>-<n>.log``.

The same is a Python API for tests: ``ServiceReplicas(settings).start(name, n)``,
``.stop(...)``, ``.kill(name, n, sig)``, ``.ports(name)``; the ``modules`` argument maps
service names to the modules run (a test points it at a stand-in).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.local.stack import ROOT, Server, StackSettings, _is_zombie, _proc_start_time, _reap, _tail

SERVICES: dict[str, str] = {
    "ingress": "services.ingress",
    "reasoning": "services.reasoning",
    "tool-exec": "services.tool_exec",
    "checkpoint": "services.checkpoint",
}
DEFAULT_BASE_PORT = 8100
MAX_REPLICAS = 9  # ports are base + 10*service + replica
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 40.0


class ReplicaStartError(RuntimeError):
    """A replica exited or did not become ready in time; ``log_tail`` says why."""

    def __init__(self, replica: Replica, why: str) -> None:
        self.replica = replica
        self.log_tail = _tail(replica.log_file, 30)
        super().__init__(f"{replica.name}: {why}; last lines of {replica.log_file}:\n{self.log_tail}")


class Replica(Server):
    """One replica of one service: a ``python -m <module>`` process serving /readyz on its port."""

    def __init__(
        self,
        settings: StackSettings,
        *,
        service: str,
        index: int,
        module: str,
        http_port: int,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        super().__init__(settings)
        self.service = service
        self.index = index
        self.module = module
        self.http_port = http_port
        self.extra_env = dict(env or {})
        self.python = python
        self.name = f"svc-{service}-{index}"

    @property
    def port(self) -> int:
        return self.http_port

    @property
    def data(self) -> Path:
        return ROOT  # the working directory: the repository, so `-m services.x` resolves there too

    def command(self) -> list[str]:
        return [self.python, "-m", self.module]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["AGENTBUS_HTTP_PORT"] = str(self.http_port)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def running_pid(self) -> int | None:
        pid = super().running_pid()
        if pid is not None and _is_zombie(pid):  # our child, dead but not yet reaped
            return None
        return pid

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.http_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


@dataclass(frozen=True)
class ReplicaStatus:
    service: str
    index: int
    port: int
    pid: int | None
    ready: bool


def free_base_port(services: int = 4, replicas: int = 9, *, rng: random.Random | None = None) -> int:
    """A base port whose replica ports (``base + 10 * service + replica``) are all free now.

    Drawn below 32768, where Linux hands out no ephemeral ports: a base in the ephemeral range
    can collide with a client connection's local port between this check and the bind.
    """
    rng = rng or random.Random()
    for _ in range(100):
        base = rng.randrange(20000, 32000, 100)
        try:
            for port in (base + 10 * s + r for s in range(services) for r in range(1, replicas + 1)):
                with socket.socket() as sock:
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free range of service ports between 20000 and 32000")


class ServiceReplicas:
    """Start, stop and signal local replicas of the agentbus services."""

    def __init__(
        self,
        settings: StackSettings | None = None,
        *,
        modules: Mapping[str, str] | None = None,
        base_port: int | None = None,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.settings = settings or StackSettings()
        self.modules = dict(SERVICES if modules is None else modules)
        if base_port is None:
            base_port = int(os.environ.get("AGENTBUS_SERVICES_BASE_PORT", DEFAULT_BASE_PORT))
        self.base_port = base_port
        self.env = dict(env or {})
        self.python = python

    # -- replicas -------------------------------------------------------------------------------

    def _check(self, name: str) -> None:
        if name not in self.modules:
            raise ValueError(f"unknown service {name!r}; choose from {', '.join(self.modules)}")

    def port(self, name: str, index: int) -> int:
        self._check(name)
        return self.base_port + 10 * list(self.modules).index(name) + index

    def replica(self, name: str, index: int) -> Replica:
        self._check(name)
        if not 1 <= index <= MAX_REPLICAS:
            raise ValueError(f"replica number must be 1..{MAX_REPLICAS}, not {index}")
        return Replica(
            self.settings,
            service=name,
            index=index,
            module=self.modules[name],
            http_port=self.port(name, index),
            env=self.env,
            python=self.python,
        )

    def known(self, name: str) -> list[Replica]:
        """Replicas of ``name`` that have a pid file (running or not), by number."""
        self._check(name)
        prefix = f"svc-{name}-"
        found = []
        for path in self.settings.run_path.glob(f"{prefix}*.pid"):
            suffix = path.stem[len(prefix) :]
            if suffix.isdigit() and 1 <= int(suffix) <= MAX_REPLICAS:
                found.append(int(suffix))
        return [self.replica(name, i) for i in sorted(found)]

    def running(self, name: str) -> list[Replica]:
        return [r for r in self.known(name) if r.running_pid() is not None]

    def ports(self, name: str) -> list[int]:
        """The HTTP ports of the running replicas of ``name``."""
        return [r.port for r in self.running(name)]

    def pids(self, name: str) -> list[int]:
        return [pid for r in self.known(name) if (pid := r.running_pid()) is not None]

    # -- start ----------------------------------------------------------------------------------

    def start(
        self,
        name: str,
        replicas: int = 1,
        *,
        wait: bool = True,
        timeout: float = START_TIMEOUT_S,
        progress: Callable[[str], None] | None = None,
    ) -> list[Replica]:
        """Make replicas 1..``replicas`` of ``name`` run (extra ones are stopped); wait for /readyz.

        Raises:
            ReplicaStartError: a replica exited or was not ready within ``timeout``.
        """
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be 1..{MAX_REPLICAS}, not {replicas}")
        say = progress or (lambda _msg: None)
        extra = [r for r in self.known(name) if r.index > replicas]
        if extra:
            for r, outcome in self._stop(extra, STOP_TIMEOUT_S).items():
                say(f"{r.name}: {outcome} (scaled down)")
        wanted = [self.replica(name, i) for i in range(1, replicas + 1)]
        for r in wanted:
            self.start_replica(r, say)
        if wait:
            self.wait_ready(wanted, timeout=timeout, progress=say)
        return wanted

    def start_replica(self, replica: Replica, say: Callable[[str], None] | None = None) -> bool:
        """Start one replica unless it runs; True when it was started now."""
        started = replica.start(say or (lambda _msg: None))
        if say is not None:
            state = "started" if started else "already running"
            say(f"{replica.name}: {state} (pid {replica.running_pid()}, port {replica.port})")
        return started

    def restart(
        self, name: str, index: int, *, wait: bool = True, timeout: float = START_TIMEOUT_S
    ) -> Replica:
        """Start replica ``index`` again (after a kill); waits for /readyz."""
        replica = self.replica(name, index)
        self.start_replica(replica)
        if wait:
            self.wait_ready([replica], timeout=timeout)
        return replica

    def wait_ready(
        self,
        replicas: Sequence[Replica],
        *,
        timeout: float = START_TIMEOUT_S,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """Return when every replica's /readyz answers 200.

        Raises:
            ReplicaStartError: one exited, or was not ready within ``timeout``.
        """
        pending = {r.name: r for r in replicas}
        deadline = time.monotonic() + timeout
        while pending:
            for key, r in list(pending.items()):
                if r.running_pid() is None:
                    raise ReplicaStartError(r, "exited during start-up")
                if r.healthy():
                    if progress is not None:
                        progress(f"{r.name}: ready on port {r.port}")
                    del pending[key]
            if pending:
                if time.monotonic() > deadline:
                    r = next(iter(pending.values()))
                    raise ReplicaStartError(r, f"not ready after {timeout:.0f}s (GET /readyz)")
                time.sleep(0.3)

    # -- stop and signal ------------------------------------------------------------------------

    def stop(
        self, name: str | None = None, index: int | None = None, *, timeout: float = STOP_TIMEOUT_S
    ) -> dict[str, str]:
        """SIGTERM the replicas (all services, one service, or one replica), SIGKILL after ``timeout``.

        Returns each replica's outcome by name.
        """
        if name is None:
            targets = [r for n in self.modules for r in self.known(n)]
        elif index is None:
            targets = self.known(name)
        else:
            targets = [self.replica(name, index)]
        return {r.name: outcome for r, outcome in self._stop(targets, timeout).items()}

    def _stop(self, replicas: Sequence[Replica], timeout: float) -> dict[Replica, str]:
        """Stop replicas together: SIGTERM to every group, wait, SIGKILL what is left."""
        outcomes: dict[Replica, str] = {}
        alive: dict[Replica, int] = {}
        for r in replicas:
            pid = r.running_pid()
            if pid is None:
                outcomes[r] = "not running"
                r.pid_file.unlink(missing_ok=True)
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            alive[r] = pid
        deadline = time.monotonic() + timeout
        while alive and time.monotonic() < deadline:
            for r, pid in list(alive.items()):
                _reap(pid)
                if r.running_pid() is None:
                    outcomes[r] = "stopped"
                    r.pid_file.unlink(missing_ok=True)
                    del alive[r]
            if alive:
                time.sleep(0.2)
        for r, pid in alive.items():
            if r.running_pid() is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                _wait_gone(r, pid, 5.0)
                outcomes[r] = "killed after timeout"
            else:
                outcomes[r] = "stopped"
            r.pid_file.unlink(missing_ok=True)
        return {r: outcomes[r] for r in replicas}

    def kill(self, name: str, index: int, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to replica ``index`` of ``name`` (its process group); returns its pid.

        With SIGKILL this returns once the process is gone. The pid file stays (``status``
        shows the replica as dead) until ``down`` or a restart.

        Raises:
            ProcessLookupError: that replica is not running.
        """
        replica = self.replica(name, index)
        pid = replica.running_pid()
        if pid is None:
            raise ProcessLookupError(f"{replica.name} is not running")
        os.killpg(pid, sig)
        if sig == signal.SIGKILL:
            _wait_gone(replica, pid, 10.0)
        return pid

    def status(self, names: Sequence[str] = ()) -> list[ReplicaStatus]:
        rows = []
        for name in names or list(self.modules):
            for r in self.known(name):
                pid = r.running_pid()
                rows.append(ReplicaStatus(name, r.index, r.port, pid, pid is not None and r.healthy()))
        return rows


def _wait_gone(replica: Replica, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if _proc_start_time(pid) is None or replica.running_pid() is None:
            return
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ CLI


def _progress() -> Callable[[str], None]:
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    return say


def _names(sup: ServiceReplicas, names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in sup.modules]
    if unknown:
        raise SystemExit(f"unknown service(s) {unknown}; choose from {', '.join(sup.modules)}")
    return list(names) or list(sup.modules)


def cmd_up(sup: ServiceReplicas, names: Sequence[str], replicas: int, timeout: float) -> int:
    say = _progress()
    started: list[Replica] = []
    for name in _names(sup, names):
        started.extend(sup.start(name, replicas, wait=False, progress=say))
    try:
        sup.wait_ready(started, timeout=timeout, progress=say)
    except ReplicaStartError as exc:
        print(f"failed to start {exc}", file=sys.stderr)
        print("other replicas are left running: `python -m infra.local.services down`", file=sys.stderr)
        return 1
    say(f"all {len(started)} replicas ready")
    return 0


def cmd_down(sup: ServiceReplicas, names: Sequence[str], timeout: float) -> int:
    outcomes: dict[str, str] = {}
    if names:
        for name in _names(sup, names):
            outcomes.update(sup.stop(name, timeout=timeout))
    else:
        outcomes = sup.stop(timeout=timeout)
    for name, outcome in outcomes.items():
        print(f"{name}: {outcome}", flush=True)
    if not outcomes:
        print("no service replicas to stop")
    return 0


def cmd_status(sup: ServiceReplicas) -> int:
    rows = sup.status()
    if not rows:
        print("no service replicas (start them with `python -m infra.local.services up`)")
        return 3
    print(f"{'replica':<18} {'port':>6} {'pid':>8}  state")
    for row in rows:
        state = "ready" if row.ready else ("not ready" if row.pid else "dead")
        print(f"{f'svc-{row.service}-{row.index}':<18} {row.port:>6} {row.pid or '-':>8}  {state}")
    return 0 if all(r.ready for r in rows) else 3


def cmd_logs(sup: ServiceReplicas, names: Sequence[str], lines: int) -> int:
    for name in _names(sup, names):
        for r in sup.known(name):
            print(f"==> {r.log_file} <==")
            print(_tail(r.log_file, lines))
    return 0


def _signal(value: str) -> int:
    text = value.upper()
    if text.isdigit():
        return int(text)
    try:
        return int(signal.Signals[text if text.startswith("SIG") else f"SIG{text}"])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {value!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agentbus-services", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-port", type=int, help="first HTTP port (AGENTBUS_SERVICES_BASE_PORT, 8100)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start replicas and wait until each answers /readyz")
    p_up.add_argument("--replicas", type=int, default=1, help=f"replicas per service (1..{MAX_REPLICAS})")
    p_up.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for /readyz")
    p_up.add_argument("services", nargs="*", default=[], help=f"any of {', '.join(SERVICES)}; default all")
    p_down = sub.add_parser("down", help="stop replicas: SIGTERM, then SIGKILL after --timeout")
    p_down.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S)
    p_down.add_argument("services", nargs="*", default=[])
    sub.add_parser("status", help="each replica's port, pid and readiness")
    p_logs = sub.add_parser("logs", help="the last lines of each replica's log")
    p_logs.add_argument("services", nargs="*", default=[])
    p_logs.add_argument("-n", "--lines", type=int, default=40)
    p_kill = sub.add_parser("kill", help="send a signal to one replica (chaos testing)")
    p_kill.add_argument("--signal", type=_signal, default=int(signal.SIGKILL), help="KILL, TERM, STOP, 9...")
    p_kill.add_argument("service")
    p_kill.add_argument("replica", type=int)
    args = parser.parse_args(argv)
    sup = ServiceReplicas(base_port=args.base_port)
    if args.command == "up":
        return cmd_up(sup, args.services, args.replicas, args.timeout)
    if args.command == "down":
        return cmd_down(sup, args.services, args.timeout)
    if args.command == "status":
        return cmd_status(sup)
    if args.command == "logs":
        return cmd_logs(sup, args.services, args.lines)
    _names(sup, [args.service])
    try:
        pid = sup.kill(args.service, args.replica, args.signal)
    except ProcessLookupError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"svc-{args.service}-{args.replica}: sent {signal.Signals(args.signal).name} to pid {pid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
