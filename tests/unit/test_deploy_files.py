"""Deploy files checked against the code: images, compose and Kubernetes manifests.

No Docker engine or cluster runs here, so these tests read the files and compare what they
say with what the code does: ports and consumer groups are the settings classes' defaults,
probe paths are the ones ``shared.service`` serves, environment variables are settings that
exist (for the service that gets them), entry points are console scripts of pyproject.toml.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import inspect
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import shared.service
from services.checkpoint.settings import CheckpointSettings
from services.ingress.settings import IngressSettings
from services.reasoning.settings import ReasoningSettings
from services.tool_exec.settings import ToolExecSettings
from shared.settings import (
    CassandraSettings,
    KafkaSettings,
    RedisSettings,
    ServiceSettings,
    Settings,
    TritonSettings,
)
from shared.topics import TOPICS

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra/docker/Dockerfile"
TRITON_DOCKERFILE = REPO / "infra/docker/Dockerfile.triton"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "infra/compose/docker-compose.yml"
OTEL_CONFIG = REPO / "infra/compose/otel-collector.yaml"
K8S = REPO / "infra/k8s"
LOCAL_BROKER = REPO / "infra/local/kafka/server.properties.in"

# Deployed name -> settings class. The name is also the image target, the compose service,
# the Deployment and the settings' service_name default (checked below).
SERVICES: dict[str, type[ServiceSettings]] = {
    "ingress": IngressSettings,
    "reasoning": ReasoningSettings,
    "tool-exec": ToolExecSettings,
    "checkpoint": CheckpointSettings,
}
# The logical topic each service consumes (checked against its main.py).
INPUT_TOPIC = {
    "ingress": "ingress",
    "reasoning": "reasoning.inbox",
    "tool-exec": "tool.calls",
    "checkpoint": "events",
}
# Services whose replicas also scale on agentbus_scaling_signal (busy / capacity counts).
SIGNAL_SCALED = {"reasoning", "tool-exec"}
# The bootstrap job runs agentbus-topics (KafkaSettings) and agentbus-migrate (CassandraSettings).
BOOTSTRAP_SETTINGS: tuple[type[Settings], ...] = (KafkaSettings, CassandraSettings)
ALL_SETTINGS: tuple[type[Settings], ...] = (
    ServiceSettings,
    KafkaSettings,
    CassandraSettings,
    RedisSettings,
    TritonSettings,
    *SERVICES.values(),
)


def default(cls: type[Settings], name: str) -> Any:
    """The default of settings field ``name`` as the dataclass declares it."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].default


def env_names(*classes: type[Settings]) -> set[str]:
    return {f.metadata["env"] for cls in classes for f in dataclasses.fields(cls)}


def http_port(service: str) -> int:
    return int(default(SERVICES[service], "http_port"))


def shutdown_grace_s(service: str, environment: dict[str, str]) -> float:
    env = ServiceSettings.env_names()["shutdown_grace_s"]
    return float(environment.get(env, default(SERVICES[service], "shutdown_grace_s")))


def unknown_env(names: set[str], *classes: type[Settings]) -> set[str]:
    """Names that are neither a setting of ``classes`` nor a standard OpenTelemetry variable."""
    return {n for n in names if n not in env_names(*classes) and not n.startswith("OTEL_")}


def served_paths() -> set[str]:
    """The HTTP paths every service serves, read from shared.service's routes."""
    paths = set(re.findall(r'web\.get\("(/[^"]*)"', inspect.getsource(shared.service)))
    assert paths, "no routes found in shared/service.py"
    return paths


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def interpolated_default(value: object) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default (what runs without overrides)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", str(value))


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


def local_broker_properties() -> dict[str, str]:
    props = {}
    for line in LOCAL_BROKER.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


# ------------------------------------------------------------------------ Dockerfile


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuation lines joined."""
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        yield keyword.upper(), args.strip()
        logical = ""
    assert not logical, f"{path}: a continuation line runs off the end"


def dockerfile_stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The file's global ARG defaults and its stages in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            stages.append(Stage(name, base))
        elif not stages and keyword == "ARG":
            name, _, value = rest.partition("=")
            args[name] = value
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        else:
            raise AssertionError(f"{path}: {keyword} before the first FROM")
    return args, stages


def service_stages() -> dict[str, Stage]:
    _, stages = dockerfile_stages(DOCKERFILE)
    names = [s.name for s in stages]
    assert len(names) == len(set(names)), f"duplicate stage names in {names}"
    return {s.name: s for s in stages}


def effective(stage: Stage, keyword: str, stages: dict[str, Stage]) -> str | None:
    """An instruction's value for ``stage``, inherited from the stages it is built on."""
    current: Stage | None = stage
    while current is not None:
        value = current.last(keyword)
        if value is not None:
            return value
        current = stages.get(current.base)
    return None


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def test_dockerfile_has_a_target_per_service_and_the_bootstrap_job() -> None:
    stages = service_stages()
    assert set(SERVICES) | {"bootstrap"} <= set(stages), sorted(stages)


def test_builder_installs_the_project_from_pyproject_into_a_venv_on_python_311_slim() -> None:
    _, stage_list = dockerfile_stages(DOCKERFILE)
    stages = {s.name: s for s in stage_list}
    builder = stages["builder"]
    assert builder.base == "python:3.11-slim"
    assert any("pyproject.toml" in c for c in builder.all("COPY"))
    runs = " ".join(builder.all("RUN"))
    assert "venv /opt/venv" in runs
    assert re.search(r"pip install (--no-deps )?\.(\s|$)", runs), "the project itself is installed"
    assert stages["runtime"].base == "python:3.11-slim"
    assert any("--from=builder /opt/venv" in c for c in stages["runtime"].all("COPY"))


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_target_runs_its_console_script_as_non_root(service: str) -> None:
    stages = service_stages()
    stage = stages[service]
    entrypoint = effective(stage, "ENTRYPOINT", stages)
    assert entrypoint is not None
    (script,) = exec_form(entrypoint)
    scripts = console_scripts()
    assert script in scripts, f"{script} is not in [project.scripts]"
    module, _, function = scripts[script].partition(":")
    assert module.startswith(f"services.{service.replace('-', '_')}."), scripts[script]
    assert callable(getattr(importlib.import_module(module), function))
    user = effective(stage, "USER", stages)
    assert user is not None and user.split(":")[0] not in ("root", "0"), user


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_target_exposes_and_health_checks_its_http_port(service: str) -> None:
    stage = service_stages()[service]
    port = http_port(service)
    assert stage.all("EXPOSE") == [str(port)]
    healthcheck = stage.last("HEALTHCHECK")
    assert healthcheck is not None
    _, _, command = healthcheck.partition("CMD ")
    probe = " ".join(exec_form(command))
    assert f"'{port}'" in probe, probe
    assert "/healthz" in probe and "/healthz" in served_paths()


def test_the_service_images_find_the_schemas_outside_the_installed_package() -> None:
    """shared.avro looks for schemas/ next to the package unless AGENTBUS_SCHEMA_DIR says where."""
    from shared.avro import SCHEMA_DIR_ENV

    runtime = service_stages()["runtime"]
    envs = " ".join(runtime.all("ENV"))
    match = re.search(rf"{SCHEMA_DIR_ENV}=(\S+)", envs)
    assert match, f"runtime sets no {SCHEMA_DIR_ENV}"
    assert any(c.split() == ["schemas", match.group(1)] for c in runtime.all("COPY"))


def test_bootstrap_target_creates_topics_and_applies_migrations_with_real_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stages = service_stages()
    entrypoint = effective(stages["bootstrap"], "ENTRYPOINT", stages)
    assert entrypoint is not None
    shell, flag, command = exec_form(entrypoint)
    assert (shell, flag) == ("/bin/sh", "-c")
    steps = [shlex.split(step) for step in command.split("&&")]
    assert steps == [["agentbus-topics", "create"], ["agentbus-migrate", "apply"]]
    scripts = console_scripts()
    for script, subcommand in steps:
        module, _, function = scripts[script].partition(":")
        main = getattr(importlib.import_module(module), function)
        with pytest.raises(SystemExit) as done:
            main(["--help"])
        assert done.value.code == 0
        usage = capsys.readouterr().out
        choices = re.search(r"\{([a-z,]+)\}", usage)
        assert choices and subcommand in choices.group(1).split(","), usage


def test_dockerignore_keeps_everything_the_images_copy() -> None:
    patterns = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "keep .dockerignore free of exceptions"
    sources = []
    for path in (DOCKERFILE, TRITON_DOCKERFILE):
        for keyword, args in dockerfile_instructions(path):
            if keyword == "COPY" and "--from=" not in args:
                words = [w for w in args.split() if not w.startswith("--")]
                sources += words[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path"
        parts = Path(source).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = [p for p in patterns for prefix in prefixes if fnmatch.fnmatch(prefix, p)]
        assert not excluded, f"COPY {source} is excluded by .dockerignore {excluded}"


def test_triton_image_pins_nvidias_server_and_serves_the_model_repository() -> None:
    _, stages = dockerfile_stages(TRITON_DOCKERFILE)
    (stage,) = stages
    image, _, tag = stage.base.partition(":")
    assert image == "nvcr.io/nvidia/tritonserver"
    assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag), f"pin a release tag, not {tag!r}"
    assert any(c.split()[-2:] == ["infra/triton/models", "/models"] for c in stage.all("COPY"))
    assert (REPO / "infra/triton/models/reference_policy/config.pbtxt").exists()
    assert sorted(" ".join(stage.all("EXPOSE")).split()) == ["8000", "8001", "8002"]
    command = " ".join(exec_form(stage.last("CMD") or "[]"))
    for flag in ("--model-repository=/models", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"):
        assert flag in command


# ------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping"
    return {k: interpolated_default(v) for k, v in env.items()}


def test_compose_runs_the_servers_observability_bootstrap_and_services(compose: dict[str, Any]) -> None:
    expected = {"kafka", "cassandra", "redis", "triton", "otel-collector", "jaeger", "bootstrap", *SERVICES}
    assert expected <= set(compose["services"]), sorted(compose["services"])
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:3.9")
    assert compose["services"]["cassandra"]["image"].startswith("cassandra:5.0")
    assert compose["services"]["redis"]["image"].startswith("redis:7")
    assert "16686:16686" in compose["services"]["jaeger"]["ports"]


def test_compose_kafka_is_the_local_broker_in_kraft_mode(compose: dict[str, Any]) -> None:
    env = {k: str(v) for k, v in compose["services"]["kafka"]["environment"].items()}
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    # Addresses and paths differ (compose adds an EXTERNAL listener for the host); the rest may not.
    host_specific = {
        "listeners",
        "advertised.listeners",
        "listener.security.protocol.map",
        "controller.quorum.voters",
        "log.dirs",
    }
    local = local_broker_properties()
    for key in ("transaction.state.log.replication.factor", "transaction.state.log.min.isr"):
        assert key in local
    mismatched = {
        key: (value, env.get("KAFKA_" + key.replace(".", "_").upper()))
        for key, value in local.items()
        if key not in host_specific and env.get("KAFKA_" + key.replace(".", "_").upper()) != value
    }
    assert not mismatched, f"compose broker differs from infra/local (local, compose): {mismatched}"


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_port_health_replicas_and_grace(compose: dict[str, Any], service: str) -> None:
    spec = compose["services"][service]
    port = http_port(service)
    env = compose_env(spec)
    assert spec["deploy"]["replicas"] == 2
    assert spec["build"]["target"] == service
    assert (COMPOSE.parent / spec["build"]["context"] / spec["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert [str(p) for p in spec["expose"]] == [str(port)]
    assert env.get("AGENTBUS_HTTP_PORT", str(port)) == str(port)
    probe = " ".join(spec["healthcheck"]["test"])
    url = re.search(r"http://[^:/]+:(\d+)(/\w+)", probe)
    assert url, probe
    assert int(url.group(1)) == port and url.group(2) in served_paths()
    assert seconds(spec["stop_grace_period"]) > shutdown_grace_s(service, env)
    assert env["OTEL_SERVICE_NAME"] == default(SERVICES[service], "service_name")


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_env_names_are_its_own_settings(compose: dict[str, Any], service: str) -> None:
    cls = SERVICES[service]
    env = compose_env(compose["services"][service])
    assert not unknown_env(set(env), cls), f"{service} is given variables it does not read"
    # Each adapter the service has is pointed at the compose server, and only those.
    assert ("AGENTBUS_REDIS_URL" in env) == issubclass(cls, RedisSettings)
    assert ("AGENTBUS_TRITON_URL" in env) == issubclass(cls, TritonSettings)
    assert env["AGENTBUS_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["AGENTBUS_CASSANDRA_HOSTS"] == "cassandra"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    # Settings must parse from these values.
    cls.from_env(env)


@pytest.mark.parametrize("service", SERVICES)
def test_compose_services_wait_for_bootstrap_and_healthy_servers(
    compose: dict[str, Any], service: str
) -> None:
    cls = SERVICES[service]
    depends = compose["services"][service]["depends_on"]
    assert isinstance(depends, dict) and all("condition" in c for c in depends.values())
    assert depends["bootstrap"]["condition"] == "service_completed_successfully"
    needed = {"kafka", "cassandra"}
    needed |= {"redis"} if issubclass(cls, RedisSettings) else set()
    needed |= {"triton"} if issubclass(cls, TritonSettings) else set()
    for server in needed:
        assert depends[server]["condition"] == "service_healthy", server
        assert "healthcheck" in compose["services"][server], f"{server} has no healthcheck"


def test_compose_bootstrap_job_reads_only_kafka_and_cassandra_settings(compose: dict[str, Any]) -> None:
    spec = compose["services"]["bootstrap"]
    assert spec["build"]["target"] == "bootstrap"
    env = compose_env(spec)
    assert not unknown_env(set(env), *BOOTSTRAP_SETTINGS)
    assert {c["condition"] for c in spec["depends_on"].values()} == {"service_healthy"}


def test_compose_tenant_secrets_file_is_valid_json(compose: dict[str, Any]) -> None:
    env = compose_env(compose["services"]["ingress"])
    secret_path = env["AGENTBUS_TENANT_SECRETS_FILE"]
    name = secret_path.rsplit("/", 1)[-1]
    assert secret_path == f"/run/secrets/{name}" and name in compose["services"]["ingress"]["secrets"]
    secrets = json.loads((COMPOSE.parent / compose["secrets"][name]["file"]).read_text())
    assert isinstance(secrets, dict) and secrets


def test_otel_collector_receives_otlp_and_exports_traces_to_jaeger(compose: dict[str, Any]) -> None:
    collector = compose["services"]["otel-collector"]
    mounted = [v.split(":") for v in collector["volumes"]]
    assert any((COMPOSE.parent / src).resolve() == OTEL_CONFIG for src, *_ in mounted)
    config = yaml.safe_load(OTEL_CONFIG.read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    exporters = [config["exporters"][name] for name in traces["exporters"] if name.startswith("otlp")]
    assert [e["endpoint"] for e in exporters] == ["jaeger:4317"]
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(config.get(kind, {})), f"undeclared {kind}"


# ------------------------------------------------------------------------ Kubernetes


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in k8s_documents():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in by_key, f"two {key}"
        by_key[key] = doc
    return by_key


def container_env(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> dict[str, str | None]:
    """Every variable a container gets: envFrom ConfigMaps/Secrets, then env (None: from a secret)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s[("ConfigMap", source["configMapRef"]["name"])]["data"])
        else:
            secret = k8s[("Secret", source["secretRef"]["name"])]
            env.update(dict.fromkeys(secret.get("stringData", secret.get("data", {}))))
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"].get("secretKeyRef") or entry["valueFrom"]["configMapKeyRef"]
            kind = "Secret" if "secretKeyRef" in entry["valueFrom"] else "ConfigMap"
            source = k8s[(kind, ref["name"])]
            assert ref["key"] in source.get("stringData", source.get("data", {})), ref
            env[entry["name"]] = None
        else:
            env[entry["name"]] = str(entry["value"])
    return env


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def test_every_k8s_file_parses_and_kustomization_lists_exactly_them() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for doc in k8s_documents():
        assert {"apiVersion", "kind", "metadata"} <= set(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == kustomization["namespace"], doc["metadata"]
    assert (K8S / "README.md").exists()


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_deployment_ports_probes_and_scrape_annotations(
    k8s: dict[tuple[str, str], dict[str, Any]], service: str
) -> None:
    deployment = k8s[("Deployment", service)]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    port = http_port(service)
    assert [p["containerPort"] for p in container["ports"]] == [port]
    paths = served_paths()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in paths
        assert container_port(container, get["port"]) == port
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in paths
    assert deployment["spec"]["replicas"] >= 2
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    assert container["image"].startswith(f"agentbus/{service}:")
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_deployment_env_names_are_its_own_settings_and_grace_covers_shutdown(
    k8s: dict[tuple[str, str], dict[str, Any]], service: str
) -> None:
    cls = SERVICES[service]
    pod = k8s[("Deployment", service)]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(k8s, container)
    assert not unknown_env(set(env), cls), f"{service} is given variables it does not read"
    assert ("AGENTBUS_REDIS_URL" in env) == issubclass(cls, RedisSettings)
    assert ("AGENTBUS_TRITON_URL" in env) == issubclass(cls, TritonSettings)
    assert env.get("AGENTBUS_HTTP_PORT", str(http_port(service))) == str(http_port(service))
    assert env["OTEL_SERVICE_NAME"] == default(cls, "service_name")
    values = {k: v for k, v in env.items() if v is not None}
    cls.from_env(values)  # every value parses
    assert pod["terminationGracePeriodSeconds"] > shutdown_grace_s(service, values)


def test_k8s_tenant_secret_reaches_ingress_only(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret_env = IngressSettings.env_names()["tenant_secrets"]
    assert secret_env in k8s[("Secret", "agentbus-tenants")]["stringData"]
    for service in SERVICES:
        (container,) = k8s[("Deployment", service)]["spec"]["template"]["spec"]["containers"]
        assert (secret_env in container_env(k8s, container)) == (service == "ingress")


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_service_and_pdb_select_the_deployments_pods(
    k8s: dict[tuple[str, str], dict[str, Any]], service: str
) -> None:
    deployment = k8s[("Deployment", service)]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]

    svc = k8s[("Service", service)]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == http_port(service)
    assert container_port(container, svc_port["targetPort"]) == http_port(service)

    pdb = k8s[("PodDisruptionBudget", service)]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == selector


@pytest.mark.parametrize("service", SERVICES)
def test_keda_scales_on_the_services_real_group_and_input_topic(
    k8s: dict[tuple[str, str], dict[str, Any]], service: str
) -> None:
    cls = SERVICES[service]
    logical = INPUT_TOPIC[service]
    assert logical in {t.name for t in TOPICS}
    main_py = (REPO / "services" / service.replace("-", "_") / "main.py").read_text()
    assert f'topic("{logical}")' in main_py, f"{service} does not consume {logical}"

    scaled = k8s[("ScaledObject", service)]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == service
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "kafka"]
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == default(cls, "group_id")
    assert meta["topic"] == f"{default(KafkaSettings, 'topic_prefix')}.{logical}"
    shared_env = k8s[("ConfigMap", "agentbus-shared")]["data"]
    assert meta["bootstrapServers"] == shared_env["AGENTBUS_KAFKA_BOOTSTRAP"]
    # The replicas' own scaling signal uses the same lag target as KEDA.
    (container,) = k8s[("Deployment", service)]["spec"]["template"]["spec"]["containers"]
    lag_target = container_env(k8s, container).get(
        KafkaSettings.env_names()["scale_lag_target"], str(default(KafkaSettings, "scale_lag_target"))
    )
    assert int(meta["lagThreshold"]) == int(str(lag_target)) > 0
    partitions = int(shared_env.get("AGENTBUS_TOPIC_PARTITIONS", default(KafkaSettings, "topic_partitions")))
    spec = next(t for t in TOPICS if t.name == logical)
    partitions = spec.partitions or partitions
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= partitions
    assert meta.get("allowIdleConsumers", "false") == "false"


@pytest.mark.parametrize("service", SERVICES)
def test_keda_signal_triggers_query_the_services_own_metric(
    k8s: dict[tuple[str, str], dict[str, Any]], service: str
) -> None:
    """reasoning and tool-exec also scale on agentbus_scaling_signal (README, "Metrics and scaling")."""
    triggers = [t for t in k8s[("ScaledObject", service)]["spec"]["triggers"] if t["type"] == "prometheus"]
    assert bool(triggers) == (service in SIGNAL_SCALED), triggers
    defined = " ".join(p.read_text() for p in (REPO / "shared").glob("*.py"))
    for trigger in triggers:
        meta = trigger["metadata"]
        match = re.fullmatch(r'sum\((agentbus_\w+)\{service="([^"]+)"\}\)', meta["query"])
        assert match, meta["query"]
        assert f'"{match.group(1)}"' in defined, f"{match.group(1)} is not a metric of shared/"
        assert match.group(2) == default(SERVICES[service], "service_name")
        assert meta["threshold"] == "1"  # the signal is 1 per replica at target
        assert meta["serverAddress"].startswith("http")


def test_k8s_bootstrap_job_runs_the_bootstrap_image_with_its_settings(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    job = k8s[("Job", "agentbus-bootstrap")]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("agentbus/bootstrap:")
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    env = container_env(k8s, container)
    assert not unknown_env(set(env), *BOOTSTRAP_SETTINGS)
    assert "AGENTBUS_KAFKA_BOOTSTRAP" in env and "AGENTBUS_CASSANDRA_HOSTS" in env


def test_k8s_triton_gets_a_gpu_and_reasoning_reaches_its_grpc_port(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = k8s[("Deployment", "triton")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert container["image"].startswith("agentbus/triton:")
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"].startswith("/v2/health/")
    svc = k8s[("Service", "triton")]
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    url = k8s[("ConfigMap", "agentbus-triton")]["data"]["AGENTBUS_TRITON_URL"]
    assert url == f"{svc['metadata']['name']}:{ports['grpc']}"


def test_every_agentbus_variable_in_the_deploy_files_is_a_real_setting() -> None:
    """A typo in a variable name would be silently ignored by the services: catch it here."""
    known = env_names(*ALL_SETTINGS)
    texts = [COMPOSE.read_text(), *(p.read_text() for p in K8S.glob("*.yaml"))]
    used = {name for text in texts for name in re.findall(r"\b(AGENTBUS_[A-Z0-9_]+)\b", text)}
    assert used
    assert not used - known, f"not settings: {sorted(used - known)}"
