"""Cassandra adapter: session factory, prepared statements, and asyncio-friendly execution.

cassandra-driver runs its own I/O thread; :func:`execute` bridges a ``ResponseFuture``
into an asyncio future so services never block their event loop on a query. Every
statement is prepared once per session (:class:`Statements`) with the consistency
level from the settings, so reads and writes carry an explicit consistency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy
from cassandra.query import BoundStatement, PreparedStatement, Statement, dict_factory

from shared.settings import CassandraSettings
from shared.telemetry import child_span

log = logging.getLogger(__name__)

__all__ = ["Statements", "connect", "consistency", "execute", "make_cluster"]


def consistency(name: str) -> int:
    """A consistency level by name (``LOCAL_QUORUM``), with a clear error for a typo."""
    try:
        return int(ConsistencyLevel.name_to_value[name.upper()])
    except KeyError:
        known = ", ".join(sorted(ConsistencyLevel.name_to_value))
        raise ValueError(f"unknown Cassandra consistency level {name!r}; one of {known}") from None


def make_cluster(settings: CassandraSettings) -> Cluster:
    """A ``Cluster`` (not connected) with token-aware, DC-local routing and explicit consistency."""
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.cassandra_local_dc)),
        consistency_level=consistency(settings.cassandra_consistency),
        serial_consistency_level=consistency(settings.cassandra_serial_consistency),
        request_timeout=settings.cassandra_request_timeout_s,
        row_factory=dict_factory,
    )
    return Cluster(
        contact_points=list(settings.cassandra_hosts),
        port=settings.cassandra_port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        protocol_version=5,
        connect_timeout=10,
        control_connection_timeout=10,
        reconnection_policy=ExponentialReconnectionPolicy(base_delay=0.5, max_delay=10.0),
        idle_heartbeat_interval=10,
    )


def connect(settings: CassandraSettings, *, keyspace: str | None = None) -> tuple[Cluster, Session]:
    """Connect; ``keyspace`` defaults to the configured one (pass ``""`` for none)."""
    cluster = make_cluster(settings)
    ks = settings.cassandra_keyspace if keyspace is None else keyspace
    session = cluster.connect(ks or None)
    return cluster, session


async def execute(
    session: Session, statement: str | Statement | PreparedStatement, params: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """Run ``statement`` without blocking the loop; returns every row (all pages) as dicts.

    Raises whatever the driver raises (``cassandra.Unavailable``, ``WriteTimeout``,
    ``OperationTimedOut``, ``InvalidRequest``...): the caller decides what is transient.
    """
    with child_span("cassandra", attributes={"db.system": "cassandra", "db.statement": _cql(statement)}):
        return await _execute(session, statement, params)


def _cql(statement: str | Statement | PreparedStatement) -> str:
    if isinstance(statement, str):
        return statement[:300]
    if isinstance(statement, BoundStatement):
        return str(statement.prepared_statement.query_string)[:300]
    if isinstance(statement, PreparedStatement):
        return str(statement.query_string)[:300]
    return str(getattr(statement, "query_string", type(statement).__name__))[:300]


async def _execute(
    session: Session, statement: str | Statement | PreparedStatement, params: Sequence[Any] | None
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    rows: list[dict[str, Any]] = []
    done: asyncio.Future[None] = loop.create_future()
    response: ResponseFuture = session.execute_async(statement, params)

    def on_page(page: list[dict[str, Any]]) -> None:
        rows.extend(page or ())  # writes answer with no rows
        if response.has_more_pages:
            response.start_fetching_next_page()
        else:
            loop.call_soon_threadsafe(_resolve, done, None)

    def on_error(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_resolve, done, exc)

    response.add_callbacks(on_page, on_error)
    await done
    return rows


def _resolve(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


class Statements:
    """Prepared statements of one session, prepared once and reused (keyed by CQL text).

    CQL names tables as ``{ks}.table``; ``{ks}`` becomes the keyspace given here, so
    statements are fully qualified (Cassandra 5 warns against prepared statements
    that rely on ``USE``).
    """

    def __init__(self, session: Session, keyspace: str) -> None:
        self._session = session
        self._keyspace = keyspace
        self._prepared: dict[str, PreparedStatement] = {}

    @property
    def session(self) -> Session:
        return self._session

    @property
    def keyspace(self) -> str:
        return self._keyspace

    def get(self, cql: str) -> PreparedStatement:
        prepared = self._prepared.get(cql)
        if prepared is None:
            prepared = self._session.prepare(cql.replace("{ks}", self._keyspace))
            self._prepared[cql] = prepared
        return prepared

    async def run(self, cql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Prepare ``cql`` (once) and execute it with ``params``."""
        return await execute(self._session, self.get(cql), list(params))


async def connect_when_reachable(
    settings: CassandraSettings, stop: asyncio.Event | None = None
) -> tuple[Cluster, Session]:
    """:func:`connect`, retried with backoff while Cassandra is down (a restart, a deploy).

    Raises:
        asyncio.CancelledError: ``stop`` was set before Cassandra answered.
    """
    delay = 0.5
    while True:
        try:
            return await asyncio.to_thread(connect, settings)
        except NoHostAvailable as exc:
            log.warning("cassandra unreachable (%s); retrying in %.1fs", exc, delay)
        if stop is not None and stop.is_set():
            raise asyncio.CancelledError("stopped before Cassandra answered")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
