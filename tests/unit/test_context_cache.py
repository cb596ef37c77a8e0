"""The reasoning replica's in-memory cache of committed states (pure logic)."""

from __future__ import annotations

from services.reasoning.cache import ContextCache

A, B, C = ("t", "a"), ("t", "b"), ("t", "c")


def test_an_entry_serves_only_its_exact_seq() -> None:
    cache = ContextCache(1000)
    cache.put(A, 4, b"state@4")
    assert cache.get(A, 4) == b"state@4"
    assert cache.get(A, 5) is None  # the session moved on (elsewhere): never served stale
    assert cache.get(A, 3) is None
    cache.put(A, 5, b"state@5")
    assert cache.get(A, 4) is None and cache.get(A, 5) == b"state@5"
    assert len(cache) == 1 and cache.size_bytes == len(b"state@5")


def test_least_recently_used_entries_go_first_past_the_byte_budget() -> None:
    cache = ContextCache(20)
    cache.put(A, 1, b"x" * 8)
    cache.put(B, 1, b"y" * 8)
    assert cache.get(A, 1) is not None  # A is now the most recently used
    cache.put(C, 1, b"z" * 8)  # 24 bytes > 20: B goes
    assert cache.get(B, 1) is None
    assert cache.get(A, 1) == b"x" * 8 and cache.get(C, 1) == b"z" * 8
    assert cache.size_bytes == 16


def test_an_entry_larger_than_the_budget_is_not_kept_and_zero_disables() -> None:
    cache = ContextCache(10)
    cache.put(A, 1, b"small")
    cache.put(A, 2, b"far too large for it")
    assert cache.get(A, 1) is None and cache.get(A, 2) is None and cache.size_bytes == 0
    off = ContextCache(0)
    off.put(A, 1, b"x")
    assert off.get(A, 1) is None and len(off) == 0
    cache.put(B, 3, b"abc")
    cache.discard(B)
    assert cache.get(B, 3) is None and cache.size_bytes == 0
