"""Pure logic of the CQL migration files and the topic specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.migrations import MigrationError, load_migrations, split_statements
from shared.settings import KafkaSettings
from shared.topics import TOPICS


def test_statements_split_on_semicolons_and_lose_comments() -> None:
    cql = """
    -- a comment; with a semicolon
    CREATE TABLE IF NOT EXISTS a (id int PRIMARY KEY, v text);  -- trailing
    // another comment
    CREATE TABLE IF NOT EXISTS b (
        id int PRIMARY KEY,  -- inline
        w text
    ) WITH compaction = {'class': 'UnifiedCompactionStrategy'};
    """
    statements = split_statements(cql)
    assert len(statements) == 2
    assert statements[0] == "CREATE TABLE IF NOT EXISTS a (id int PRIMARY KEY, v text)"
    assert "inline" not in statements[1] and statements[1].endswith("'UnifiedCompactionStrategy'}")


def test_repository_migrations_load_in_version_order() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations[0].version == 1
    assert all(
        s.upper().startswith("CREATE ") and "IF NOT EXISTS" in s.upper() for s in migrations[0].statements
    )


def test_badly_named_or_duplicate_migrations_are_refused(tmp_path: Path) -> None:
    (tmp_path / "init.cql").write_text("CREATE TABLE IF NOT EXISTS x (id int PRIMARY KEY);")
    with pytest.raises(MigrationError, match=r"V<NNN>__<name>\.cql"):
        load_migrations(tmp_path)
    (tmp_path / "init.cql").unlink()
    (tmp_path / "V001__a.cql").write_text("CREATE TABLE IF NOT EXISTS x (id int PRIMARY KEY);")
    (tmp_path / "V1__b.cql").write_text("CREATE TABLE IF NOT EXISTS y (id int PRIMARY KEY);")
    with pytest.raises(MigrationError, match="two migrations with version 1"):
        load_migrations(tmp_path)


def test_every_design_topic_is_declared_and_the_dlq_is_kept_longest() -> None:
    names = {t.name for t in TOPICS}
    assert names == {"ingress", "reasoning.inbox", "tool.calls", "responses", "events", "dlq"}
    retention = {t.name: t.retention_ms for t in TOPICS}
    assert retention["dlq"] == max(retention.values())
    configs = {t.name: t.configs(KafkaSettings()) for t in TOPICS}
    assert all(c["cleanup.policy"] == "delete" for c in configs.values())
