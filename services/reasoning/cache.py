"""The states this replica committed, kept in memory as a cache in front of Redis.

A session's state at seq ``s`` is a pure function of its events ``0..s``, and those are
immutable once committed. An entry is written only after the transaction that published
the state's events committed, so the entry for ``(session, s)`` is *the* state at ``s``,
whoever owns the session later. It is used only when ``s`` is the session's head as the
partition worker knows it (from the events partition and its own commits), so a session
that moved on elsewhere (another owner, a lost partition) is never served stale: its head
differs and the lookup misses. Losing the cache (a crash, an eviction) costs a Redis or
Cassandra load, nothing else (DESIGN rule 4: nothing that matters lives only here).

Entries are the state's JSON (the same bytes the Redis hot context holds), so a caller
always decodes a fresh object and a failed attempt that mutated its copy leaves the
entry untouched. The cache is an LRU under a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["ContextCache"]

SessionKey = tuple[str, str]


class ContextCache:
    """``(tenant, session) -> (seq, state JSON)``, least recently used evicted past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self._entries: OrderedDict[SessionKey, tuple[int, bytes]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, key: SessionKey, seq: int) -> bytes | None:
        """The state JSON of ``key`` at exactly ``seq``, or None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != seq:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: SessionKey, seq: int, data: bytes) -> None:
        """Remember ``data`` as the committed state of ``key`` at ``seq`` (replacing older)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])
        if len(data) > self.max_bytes:
            return
        self._entries[key] = (seq, data)
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def discard(self, key: SessionKey) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])
