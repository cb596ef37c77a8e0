"""Settings: every field has an env name and a doc; values parse by type; bad values are clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from services.checkpoint.settings import CheckpointSettings
from services.ingress.settings import IngressSettings
from services.reasoning.settings import ReasoningSettings
from services.tool_exec.settings import ToolExecSettings
from shared.settings import Settings, SettingsError

SERVICE_SETTINGS: list[type[Settings]] = [
    IngressSettings,
    ReasoningSettings,
    ToolExecSettings,
    CheckpointSettings,
]


@pytest.mark.parametrize("cls", SERVICE_SETTINGS, ids=lambda c: c.__name__)
def test_every_field_declares_env_default_and_doc(cls: type[Settings]) -> None:
    envs = [f.metadata.get("env") for f in dataclasses.fields(cls)]
    assert all(e and e.startswith("AGENTBUS_") for e in envs)
    assert len(envs) == len(set(envs)), "two fields of one service share an environment variable"
    for f in dataclasses.fields(cls):
        assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no description"
        assert f.default is not dataclasses.MISSING
    described = cls.describe()
    assert all(e in described for e in envs)


def test_each_service_names_itself() -> None:
    names = {cls.from_env({}).service_name for cls in SERVICE_SETTINGS}  # type: ignore[attr-defined]
    assert names == {"ingress", "reasoning", "tool-exec", "checkpoint"}


def test_values_parse_by_type() -> None:
    s = ToolExecSettings.from_env(
        {
            "AGENTBUS_TOOL_SLOTS": "12",
            "AGENTBUS_TOOL_TIMEOUT_S": "2.5",
            "AGENTBUS_HTTP_ALLOWLIST": "example.org, 127.0.0.1 ,",
            "AGENTBUS_CASSANDRA_HOSTS": "10.0.0.1,10.0.0.2",
        }
    )
    assert s.slots == 12 and s.default_timeout_s == 2.5
    assert s.http_allowlist == ("example.org", "127.0.0.1")
    assert s.cassandra_hosts == ("10.0.0.1", "10.0.0.2")


def test_overrides_win_over_the_environment() -> None:
    s = CheckpointSettings.from_env({"AGENTBUS_SNAPSHOT_EVERY": "7"}, snapshot_every=9)
    assert s.snapshot_every == 9


@pytest.mark.parametrize(
    ("env", "value"),
    [("AGENTBUS_TOOL_SLOTS", "many"), ("AGENTBUS_TOOL_TIMEOUT_S", "soon"), ("AGENTBUS_TOOL_SLOTS", "1.5")],
)
def test_bad_values_name_the_variable(env: str, value: str) -> None:
    with pytest.raises(SettingsError, match=env):
        ToolExecSettings.from_env({env: value})


def test_topic_names_carry_the_prefix() -> None:
    s = IngressSettings.from_env({"AGENTBUS_TOPIC_PREFIX": "acme"})
    assert s.topic("reasoning.inbox") == "acme.reasoning.inbox"


def test_readme_configuration_table_lists_every_variable() -> None:
    from pathlib import Path

    from infra.local.stack import StackSettings

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    classes: list[type] = [*SERVICE_SETTINGS, StackSettings]
    missing = sorted(
        {f.metadata["env"] for cls in classes for f in dataclasses.fields(cls)}
        - {line.split("`")[1] for line in readme.splitlines() if line.startswith("| `AGENTBUS_")}
    )
    assert not missing, f"README's configuration table lacks {missing}"
