"""Local launcher for the real servers agentbus needs: Kafka (KRaft), Cassandra 5.0, Redis, Triton.

Every server is a plain process on 127.0.0.1, started from pinned artifacts (Maven
Central jars, Debian's redis-server, the nvidia-pytriton wheel's tritonserver), with
its data under a git-ignored folder. ``up`` is idempotent and returns only when
every server answers; ``down`` stops exactly the processes ``up`` started, found
by pid file and checked by start time, never by name.

    python -m infra.local.stack up [SERVER...]
    python -m infra.local.stack down [SERVER...]
    python -m infra.local.stack status
    python -m infra.local.stack logs SERVER [-n LINES]
    python -m infra.local.stack env        # print the settings and their env names
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _env(name: str, default: str, doc: str) -> str:
    return field(default=os.environ.get(name, default), metadata={"env": name, "doc": doc})


@dataclass(frozen=True)
class StackSettings:
    """Where and how the local servers run; every field comes from an environment variable."""

    home: str = _env("AGENTBUS_LOCAL_DIR", str(ROOT / ".local"), "Folder for jars, pid files and logs")
    data_dir: str = _env(
        "AGENTBUS_DATA_DIR", "", "Folder for server data (default: $AGENTBUS_LOCAL_DIR/data)"
    )
    kafka_port: str = _env("AGENTBUS_KAFKA_PORT", "19092", "Kafka PLAINTEXT listener port")
    kafka_controller_port: str = _env("AGENTBUS_KAFKA_CONTROLLER_PORT", "19093", "KRaft controller port")
    kafka_heap: str = _env("AGENTBUS_KAFKA_HEAP", "512m", "Kafka JVM max heap (-Xmx)")
    cassandra_port: str = _env("AGENTBUS_CASSANDRA_PORT", "19042", "Cassandra CQL native port")
    cassandra_storage_port: str = _env("AGENTBUS_CASSANDRA_STORAGE_PORT", "17000", "Cassandra gossip port")
    cassandra_jmx_port: str = _env("AGENTBUS_CASSANDRA_JMX_PORT", "17199", "Cassandra local JMX port")
    cassandra_heap: str = _env("AGENTBUS_CASSANDRA_HEAP", "1g", "Cassandra JVM heap (-Xms and -Xmx)")
    redis_port: str = _env("AGENTBUS_REDIS_PORT", "16379", "Redis port")
    redis_appendonly: str = _env(
        "AGENTBUS_REDIS_APPENDONLY", "no", "yes: Redis keeps an AOF (demo); no: tests"
    )
    triton_http_port: str = _env("AGENTBUS_TRITON_HTTP_PORT", "18000", "Triton HTTP port")
    triton_grpc_port: str = _env("AGENTBUS_TRITON_GRPC_PORT", "18001", "Triton gRPC port")
    triton_metrics_port: str = _env("AGENTBUS_TRITON_METRICS_PORT", "18002", "Triton Prometheus metrics port")
    triton_models: str = _env(
        "AGENTBUS_TRITON_MODEL_REPOSITORY",
        str(ROOT / "infra" / "triton" / "models"),
        "Triton model repository",
    )
    start_timeout: str = _env("AGENTBUS_START_TIMEOUT", "300", "Seconds `up` waits for every server")

    @property
    def home_path(self) -> Path:
        return Path(self.home)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else self.home_path / "data"

    @property
    def lib_path(self) -> Path:
        return self.home_path / "lib"

    @property
    def run_path(self) -> Path:
        return self.home_path / "run"

    @property
    def log_path(self) -> Path:
        return self.home_path / "logs"


def _render(template: Path, out: Path, **values: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(string.Template(template.read_text()).substitute(values))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a pid (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _is_zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state == "Z":
        _reap(pid)
        return True
    return False


def _fetch_jars(pom: Path, lib: Path, progress: Callable[[str], None]) -> None:
    """Copy a pom's runtime jars into ``lib`` once; a stamp of the pom's hash skips Maven next time."""
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    stamp = lib / ".pom-sha256"
    if stamp.exists() and stamp.read_text() == digest:
        return
    if shutil.which("mvn") is None:
        raise SystemExit("mvn not found: install Maven (apt-get install -y maven)")
    progress(f"fetching jars for {pom.parent.name} from Maven Central (first run only)")
    if lib.exists():
        shutil.rmtree(lib)
    lib.mkdir(parents=True)
    subprocess.run(
        [
            "mvn",
            "-B",
            "-q",
            "-Dstyle.color=never",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={lib}",
            "-DincludeScope=runtime",
        ],
        check=True,
    )
    stamp.write_text(digest)


class Server:
    """One local server process: how to prepare, start and probe it."""

    name = ""

    def __init__(self, settings: StackSettings) -> None:
        self.s = settings

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def pid_file(self) -> Path:
        return self.s.run_path / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.s.log_path / f"{self.name}.log"

    @property
    def data(self) -> Path:
        return self.s.data_path / self.name

    def prepare(self, progress: Callable[[str], None]) -> None:
        """Download, render configuration, format storage: everything before the first start."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def healthy(self) -> bool:
        raise NotImplementedError

    # -- process bookkeeping -------------------------------------------------------------------

    def running_pid(self) -> int | None:
        """The pid this launcher started, if that very process is still alive."""
        try:
            pid_text, started = self.pid_file.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if _proc_start_time(pid) != started:
            return None
        return pid

    def start(self, progress: Callable[[str], None]) -> bool:
        """Start the process unless ours is already running; True when it was started now."""
        if self.running_pid() is not None:
            return False
        if port_open(self.port):
            raise SystemExit(
                f"{self.name}: port {self.port} is taken by a process this launcher did not start; "
                f"stop it or choose another port (see `python -m infra.local.stack env`)"
            )
        self.prepare(progress)
        self.s.run_path.mkdir(parents=True, exist_ok=True)
        self.s.log_path.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,
                cwd=str(self.data),
            )
        started = _proc_start_time(proc.pid)
        self.pid_file.write_text(f"{proc.pid} {started}\n")
        return True

    def stop(self, timeout: float = 60.0) -> str:
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return "not running"
        # The process leads its own session (start_new_session): signal the group so helper
        # processes it spawned (Triton's Python backend stubs) go with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running_pid() is not None:
            _reap(pid)
            time.sleep(0.2)
        outcome = "stopped"
        if self.running_pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            outcome = "killed after timeout"
            time.sleep(0.5)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return outcome


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class Kafka(Server):
    name = "kafka"

    @property
    def port(self) -> int:
        return int(self.s.kafka_port)

    @property
    def lib(self) -> Path:
        return self.s.lib_path / "kafka"

    @property
    def config(self) -> Path:
        return self.data / "server.properties"

    def prepare(self, progress: Callable[[str], None]) -> None:
        _fetch_jars(HERE / "kafka" / "pom.xml", self.lib, progress)
        logs = self.data / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _render(
            HERE / "kafka" / "server.properties.in",
            self.config,
            port=self.s.kafka_port,
            controller_port=self.s.kafka_controller_port,
            log_dirs=str(logs),
        )
        if not (logs / "meta.properties").exists():
            progress("formatting Kafka storage (KRaft)")
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(
                [
                    "java",
                    "-cp",
                    f"{self.lib}/*",
                    f"-Dlog4j.configuration=file:{HERE / 'kafka' / 'log4j.properties'}",
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(self.config),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )

    def command(self) -> list[str]:
        return [
            "java",
            f"-Xmx{self.s.kafka_heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.data / 'app-logs'}",
            f"-Dlog4j.configuration=file:{HERE / 'kafka' / 'log4j.properties'}",
            "-cp",
            f"{self.lib}/*",
            "kafka.Kafka",
            str(self.config),
        ]

    def healthy(self) -> bool:
        if not port_open(self.port):
            return False
        return asyncio.run(_kafka_metadata_ok(f"127.0.0.1:{self.port}"))


async def _kafka_metadata_ok(bootstrap: str) -> bool:
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await asyncio.wait_for(client.bootstrap(), 5)
        metadata = await asyncio.wait_for(client.fetch_all_metadata(), 5)
        return len(metadata.brokers()) > 0
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
    finally:
        await client.close()


class Cassandra(Server):
    name = "cassandra"

    @property
    def port(self) -> int:
        return int(self.s.cassandra_port)

    @property
    def lib(self) -> Path:
        return self.s.lib_path / "cassandra"

    @property
    def config(self) -> Path:
        return self.data / "cassandra.yaml"

    def prepare(self, progress: Callable[[str], None]) -> None:
        _fetch_jars(HERE / "cassandra" / "pom.xml", self.lib, progress)
        self.data.mkdir(parents=True, exist_ok=True)
        _render(
            HERE / "cassandra" / "cassandra.yaml.in",
            self.config,
            data_dir=str(self.data),
            storage_port=self.s.cassandra_storage_port,
            ssl_storage_port=str(int(self.s.cassandra_storage_port) + 1),
            native_port=self.s.cassandra_port,
        )

    def command(self) -> list[str]:
        # One flag per line; "--add-opens X" becomes "--add-opens=X" so it stays one argument.
        jvm_flags = [
            line.strip().replace(" ", "=", 1)
            for line in (HERE / "cassandra" / "jvm17.options").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        jamm = sorted(self.lib.glob("jamm-*.jar"))
        agent = [f"-javaagent:{jamm[0]}"] if jamm else []
        return [
            "java",
            f"-Xms{self.s.cassandra_heap}",
            f"-Xmx{self.s.cassandra_heap}",
            "-Xss256k",
            *jvm_flags,
            *agent,
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.config=file://{self.config}",
            f"-Dcassandra.storagedir={self.data}",
            f"-Dcassandra.logdir={self.data / 'app-logs'}",
            f"-Dlogback.configurationFile={HERE / 'cassandra' / 'logback.xml'}",
            f"-Dcassandra.jmx.local.port={self.s.cassandra_jmx_port}",
            # Fast start for a single node: no gossip settling, short ring delay.
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=1000",
            "-Dcassandra.load_ring_state=false",
            "-Dcassandra.initial_token=0",
            "-cp",
            f"{self.lib}/*",
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    def healthy(self) -> bool:
        if not port_open(self.port):
            return False
        from shared.cassandra import make_cluster
        from shared.settings import CassandraSettings

        cluster = make_cluster(CassandraSettings(cassandra_port=self.port, cassandra_request_timeout_s=5))
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            return row is not None
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False
        finally:
            cluster.shutdown()


class Redis(Server):
    name = "redis"

    @property
    def port(self) -> int:
        return int(self.s.redis_port)

    def prepare(self, progress: Callable[[str], None]) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server not found: run `make setup` (installs Debian's redis-server)")
        self.data.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--dir",
            str(self.data),
            "--save",
            "",
            "--appendonly",
            self.s.redis_appendonly,
            "--maxclients",
            "10000",
        ]

    def healthy(self) -> bool:
        if not port_open(self.port):
            return False
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


class Triton(Server):
    name = "triton"

    @property
    def port(self) -> int:
        return int(self.s.triton_http_port)

    @property
    def backends(self) -> Path:
        return self.s.home_path / "triton-backends"

    @staticmethod
    def pytriton_root() -> Path:
        try:
            import pytriton
        except ImportError as exc:
            raise SystemExit("nvidia-pytriton is not installed: run `make setup`") from exc
        return Path(pytriton.__file__).resolve().parent / "tritonserver"

    def prepare(self, progress: Callable[[str], None]) -> None:
        # The wheel keeps the Python backend stub per Python version; Triton looks for it in the
        # backend folder itself. Build that folder from links.
        root = self.pytriton_root()
        python_backend = self.backends / "python"
        python_backend.mkdir(parents=True, exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        sources = [
            *sorted((root / "backends" / "python").iterdir()),
            *sorted((root / "python_backend_stubs" / version).iterdir()),
        ]
        for src in sources:
            link = python_backend / src.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src)
        self.data.mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython3.11.so: the interpreter's own one must come first, or
        # Debian's older 3.11 is picked and breaks multiprocessing inside the model.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        root = self.pytriton_root()
        env["LD_LIBRARY_PATH"] = ":".join(
            p for p in [libdir, str(root / "external_libs"), env.get("LD_LIBRARY_PATH", "")] if p
        )
        # Models import numpy from this environment (the stub's embedded interpreter ignores
        # PYTHONPATH, so model.py reads this variable itself).
        env["AGENTBUS_MODEL_PYTHONPATH"] = ":".join(
            p for p in [sysconfig.get_paths()["purelib"], str(ROOT), env.get("PYTHONPATH", "")] if p
        )
        return env

    def command(self) -> list[str]:
        return [
            str(self.pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={self.s.triton_models}",
            f"--backend-directory={self.backends}",
            f"--http-port={self.s.triton_http_port}",
            f"--grpc-port={self.s.triton_grpc_port}",
            f"--metrics-port={self.s.triton_metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.s.triton_http_port}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


SERVERS: dict[str, type[Server]] = {cls.name: cls for cls in (Kafka, Cassandra, Redis, Triton)}


def _select(settings: StackSettings, names: Sequence[str]) -> list[Server]:
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        raise SystemExit(f"unknown server(s) {unknown}; choose from {sorted(SERVERS)}")
    return [SERVERS[n](settings) for n in (names or list(SERVERS))]


def _rss_mib(pid: int) -> float | None:
    """Resident memory of a process group leader plus its direct children, in MiB."""
    total = 0
    found = False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pgid = int(stat[2])
        if pgid != pid:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                found = True
    return total / 1024 if found else None


def cmd_up(settings: StackSettings, names: Sequence[str]) -> int:
    servers = _select(settings, names)
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    for server in servers:
        if server.start(progress):
            progress(f"{server.name}: started (pid {server.running_pid()}, port {server.port})")
        else:
            progress(f"{server.name}: already running (pid {server.running_pid()})")
    pending = {s.name: s for s in servers}
    deadline = time.monotonic() + float(settings.start_timeout)
    while pending:
        for name, server in list(pending.items()):
            if server.running_pid() is None:
                print(f"{name} exited during start-up; last lines of {server.log_file}:", file=sys.stderr)
                print(_tail(server.log_file, 30), file=sys.stderr)
                return 1
            if server.healthy():
                progress(f"{name}: ready on port {server.port}")
                del pending[name]
        if pending:
            if time.monotonic() > deadline:
                print(f"timed out waiting for {sorted(pending)}; see `make logs`", file=sys.stderr)
                return 1
            time.sleep(1.0)
    progress("all servers ready")
    return 0


def cmd_down(settings: StackSettings, names: Sequence[str]) -> int:
    # Stop in reverse dependency order: Triton and Redis are quick, Kafka and Cassandra flush.
    for server in reversed(_select(settings, names)):
        print(f"{server.name}: {server.stop()}", flush=True)
    return 0


def cmd_status(settings: StackSettings) -> int:
    print(f"{'server':<10} {'port':>6} {'pid':>8} {'rss MiB':>8}  health")
    all_ok = True
    for server in _select(settings, []):
        pid = server.running_pid()
        ok = pid is not None and server.healthy()
        all_ok = all_ok and ok
        rss = _rss_mib(pid) if pid else None
        health = "ready" if ok else ("starting/unhealthy" if pid else "stopped")
        rss_text = f"{rss:8.0f}" if rss is not None else f"{'-':>8}"
        print(f"{server.name:<10} {server.port:>6} {pid or '-':>8} {rss_text}  {health}")
    return 0 if all_ok else 3


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def cmd_logs(settings: StackSettings, names: Sequence[str], lines: int) -> int:
    for server in _select(settings, names):
        print(f"==> {server.log_file} <==")
        print(_tail(server.log_file, lines))
    return 0


def cmd_env(settings: StackSettings) -> int:
    for f in fields(settings):
        print(f"{f.metadata['env']:<34} {getattr(settings, f.name)!s:<28} {f.metadata['doc']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agentbus-stack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down"):
        p = sub.add_parser(name)
        p.add_argument("servers", nargs="*", default=[], help=f"any of {', '.join(SERVERS)}; default all")
    sub.add_parser("status")
    p_logs = sub.add_parser("logs")
    p_logs.add_argument("servers", nargs="*", default=[])
    p_logs.add_argument("-n", "--lines", type=int, default=40)
    sub.add_parser("env")
    args = parser.parse_args(argv)
    settings = StackSettings()
    if args.command == "up":
        return cmd_up(settings, args.servers)
    if args.command == "down":
        return cmd_down(settings, args.servers)
    if args.command == "status":
        return cmd_status(settings)
    if args.command == "logs":
        return cmd_logs(settings, args.servers, args.lines)
    return cmd_env(settings)


if __name__ == "__main__":
    sys.exit(main())
