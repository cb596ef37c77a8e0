"""Versioned CQL migrations, applied idempotently, with the applied versions recorded.

    python -m shared.migrations apply    # create the keyspace, apply what is missing
    python -m shared.migrations status   # applied and pending versions

Files are ``infra/cassandra/migrations/V<NNN>__<name>.cql``; statements end with
``;`` and are written without a keyspace (they run inside the configured one).
Each applied version is recorded in ``schema_migrations`` with a checksum; an
applied file that was edited afterwards is an error, not a silent skip. Every
statement of a migration is itself idempotent (``IF NOT EXISTS``), so a run that
died half-way is simply run again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cassandra.cluster import Session

from shared.cassandra import connect
from shared.settings import CassandraSettings

MIGRATIONS_DIR = Path(
    os.environ.get(
        "AGENTBUS_MIGRATIONS_DIR", Path(__file__).resolve().parent.parent / "infra/cassandra/migrations"
    )
)
_FILE = re.compile(r"^V(\d+)__([A-Za-z0-9_]+)\.cql$")
_KEYSPACE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")


class MigrationError(RuntimeError):
    """The migrations folder or the recorded history is inconsistent."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    checksum: str


def split_statements(cql: str) -> list[str]:
    """Statements of a CQL file: ``--`` and ``//`` comments dropped, split on a closing ``;``."""
    lines = []
    for line in cql.splitlines():
        stripped = re.split(r"\s(--|//)|^(--|//)", line, maxsplit=1)[0]
        lines.append(stripped.rstrip())
    text = "\n".join(lines)
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", text) if s.strip()]


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.cql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named V<NNN>__<name>.cql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations with version {version}")
        text = path.read_text()
        found[version] = Migration(
            version, match.group(2), tuple(split_statements(text)), hashlib.sha256(text.encode()).hexdigest()
        )
    return [found[v] for v in sorted(found)]


def _ensure_keyspace(session: Session, settings: CassandraSettings) -> str:
    keyspace = settings.cassandra_keyspace
    if not _KEYSPACE.match(keyspace):
        raise MigrationError(f"invalid keyspace name {keyspace!r}")
    replication = settings.cassandra_replication
    strategy = (
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        if replication == 1
        else f"{{'class': 'NetworkTopologyStrategy', '{settings.cassandra_local_dc}': {replication}}}"
    )
    session.execute(f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {strategy}")
    session.set_keyspace(keyspace)
    session.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version int PRIMARY KEY, name text, checksum text, applied_at timestamp)"
    )
    return keyspace


def applied_versions(session: Session) -> dict[int, tuple[str, str]]:
    return {
        r["version"]: (r["name"], r["checksum"])
        for r in session.execute("SELECT version, name, checksum FROM schema_migrations")
    }


def apply_migrations(
    session: Session, settings: CassandraSettings, migrations: Sequence[Migration] | None = None
) -> list[str]:
    """Create the keyspace and apply every pending migration in order; returns what was done."""
    todo = load_migrations() if migrations is None else list(migrations)
    _ensure_keyspace(session, settings)
    done = applied_versions(session)
    report = []
    for m in todo:
        if m.version in done:
            name, checksum = done[m.version]
            if checksum != m.checksum:
                raise MigrationError(
                    f"V{m.version:03d}__{m.name} was applied with checksum {checksum[:12]} but the file now "
                    f"has {m.checksum[:12]}: applied migrations are immutable; add a new version instead"
                )
            report.append(f"ok V{m.version:03d}__{name}")
            continue
        for statement in m.statements:
            session.execute(statement, timeout=60)
        session.execute(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (%s, %s, %s, %s)",
            (m.version, m.name, m.checksum, dt.datetime.now(dt.UTC)),
        )
        report.append(f"applied V{m.version:03d}__{m.name} ({len(m.statements)} statements)")
    # Wait until every node agrees on the schema before anyone prepares statements on it.
    session.cluster.control_connection.wait_for_schema_agreement()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agentbus-migrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["apply", "status"])
    args = parser.parse_args(argv)
    settings = CassandraSettings.from_env()
    cluster, session = connect(settings, keyspace="")
    try:
        if args.command == "apply":
            lines = apply_migrations(session, settings)
        else:
            _ensure_keyspace(session, settings)
            done = applied_versions(session)
            lines = [
                f"{'applied' if m.version in done else 'pending'} V{m.version:03d}__{m.name}"
                for m in load_migrations()
            ]
    finally:
        cluster.shutdown()
    for line in lines:
        sys.stdout.write(f"{settings.cassandra_keyspace}: {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
