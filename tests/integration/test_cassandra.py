"""Cassandra on the real server: migrations, idempotent appends, ordered reads."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from cassandra.cluster import Session

from shared.cassandra import Statements, consistency
from shared.eventlog import EVENTS_PER_BUCKET, EventLog, StoredEvent
from shared.migrations import MigrationError, applied_versions, apply_migrations, load_migrations
from shared.settings import CassandraSettings


def _event(tenant: str, session: str, seq: int, body: bytes = b"") -> StoredEvent:
    return StoredEvent(
        tenant,
        session,
        seq,
        f"turn-{seq // 5}",
        "MODEL_DECIDED",
        body or f"e{seq}".encode(),
        "0" * 32,
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=seq),
    )


async def test_same_session_and_seq_twice_leaves_one_row(statements: Statements, run_id: str) -> None:
    log = EventLog(statements)
    await log.append([_event("t1", run_id, 0), _event("t1", run_id, 1)])
    await log.append([_event("t1", run_id, 1), _event("t1", run_id, 1)])  # a replayed record
    rows = await statements.run(
        "SELECT seq FROM {ks}.session_events WHERE tenant_id = ? AND session_id = ? AND bucket = 0",
        ("t1", run_id),
    )
    assert [r["seq"] for r in rows] == [0, 1]


async def test_session_reads_back_in_seq_order_across_buckets(statements: Statements, run_id: str) -> None:
    log = EventLog(statements)
    total = EVENTS_PER_BUCKET + 250
    events = [_event("t1", run_id, seq) for seq in range(total)]
    # Written out of order, in several batches, the way a checkpoint replica may see them.
    await log.append(events[700:])
    await log.append(list(reversed(events[:700])))
    back = await log.read("t1", run_id)
    assert [e.seq for e in back] == list(range(total))
    assert back[1234] == events[1234]
    tail = await log.read("t1", run_id, from_seq=990)
    assert [e.seq for e in tail] == list(range(990, total))


async def test_a_tenant_cannot_read_another_tenants_session(statements: Statements, run_id: str) -> None:
    log = EventLog(statements)
    await log.append([_event("tenant-a", run_id, 0)])
    assert await log.read("tenant-b", run_id) == []
    assert len(await log.read("tenant-a", run_id)) == 1


def test_migrations_are_recorded_and_reapplying_is_a_no_op(
    cassandra_session: Session, cassandra_settings: CassandraSettings
) -> None:
    versions = applied_versions(cassandra_session)
    assert sorted(versions) == [m.version for m in load_migrations()]
    again = apply_migrations(cassandra_session, cassandra_settings)
    assert all(line.startswith("ok ") for line in again)
    tables = {
        r["table_name"]
        for r in cassandra_session.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s",
            (cassandra_settings.cassandra_keyspace,),
        )
    }
    assert {
        "session_events",
        "session_snapshots",
        "tool_results",
        "artifacts",
        "sessions",
        "schema_migrations",
    } <= tables


def test_an_edited_applied_migration_is_refused(
    cassandra_session: Session, cassandra_settings: CassandraSettings
) -> None:
    first = load_migrations()[0]
    edited = dataclasses.replace(first, checksum="0" * 64)
    with pytest.raises(MigrationError, match="immutable"):
        apply_migrations(cassandra_session, cassandra_settings, [edited])


def test_a_new_migration_is_applied_once(
    cassandra_session: Session, cassandra_settings: CassandraSettings, tmp_path: Path
) -> None:
    for m in load_migrations():
        (tmp_path / f"V{m.version:03d}__{m.name}.cql").write_text(
            (
                Path(__file__).parents[2] / "infra/cassandra/migrations" / f"V{m.version:03d}__{m.name}.cql"
            ).read_text()
        )
    (tmp_path / "V900__test_table.cql").write_text(
        "-- a later migration\nCREATE TABLE IF NOT EXISTS test_later (id int PRIMARY KEY, v text);\n"
    )
    migrations = load_migrations(tmp_path)
    report = apply_migrations(cassandra_session, cassandra_settings, migrations)
    assert report[-1] == "applied V900__test_table (1 statements)"
    assert apply_migrations(cassandra_session, cassandra_settings, migrations)[-1] == "ok V900__test_table"
    assert 900 in applied_versions(cassandra_session)


def test_consistency_names_are_checked() -> None:
    assert consistency("local_quorum") == consistency("LOCAL_QUORUM")
    with pytest.raises(ValueError, match="unknown Cassandra consistency"):
        consistency("QUORUMM")
