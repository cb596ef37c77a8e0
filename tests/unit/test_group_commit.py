"""Group commit and the offset watermark (pure logic; the broker side is in tests/integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import pytest
from aiokafka import TopicPartition

from shared.kafka import (
    GroupCommitter,
    OffsetWatermark,
    OutRecord,
    PartitionNotOwnedError,
    TransactionAbortedError,
)

TP = TopicPartition("inbox", 0)


def test_watermark_commits_up_to_the_oldest_unfinished_offset() -> None:
    w = OffsetWatermark()
    for offset in (10, 11, 12, 13):
        w.add(offset)
    assert w.commit_point(11) == 10
    assert w.commit_point(10) == 11
    assert w.commit_point([10, 11]) == 12
    assert w.commit_point([10, 11, 12, 13]) == 14
    assert w.commit_point({12, 13}) == 10
    w.done(10)
    assert w.commit_point() == 11
    with pytest.raises(ValueError):
        OffsetWatermark().commit_point()


class RecordingTxns:
    """Stands in for PartitionTransactions: records each commit; each takes one loop turn."""

    def __init__(self, fail: list[BaseException] | None = None) -> None:
        self.commits: list[tuple[list[bytes], int]] = []
        self.fail = fail or []

    async def commit(
        self,
        tp: TopicPartition,
        records: Sequence[OutRecord],
        next_offsets: Callable[[], Mapping[TopicPartition, int]] | None,
    ) -> None:
        await asyncio.sleep(0.01)
        if self.fail:
            raise self.fail.pop(0)
        # -1: the transaction published records only (interval mode)
        self.commits.append(([r.value for r in records], -1 if next_offsets is None else next_offsets()[tp]))


def _committer(
    txns: RecordingTxns, watermark: OffsetWatermark, max_batch: int = 500, interval: float = 0.0
) -> GroupCommitter:
    return GroupCommitter(txns, TP, watermark, max_batch=max_batch, offset_interval_s=interval)  # type: ignore[arg-type]


def _running(
    n_offsets: int, txns: RecordingTxns | None = None, max_batch: int = 500, interval: float = 0.0
) -> tuple[OffsetWatermark, RecordingTxns, GroupCommitter]:
    """Offsets 0..n_offsets-1 in flight, the transactions recorded, and their committer."""
    w = OffsetWatermark()
    for offset in range(n_offsets):
        w.add(offset)
    txns = txns if txns is not None else RecordingTxns()
    return w, txns, _committer(txns, w, max_batch=max_batch, interval=interval)


async def test_records_finishing_together_share_one_transaction() -> None:
    w, txns, c = _running(6)
    # 1, 2, 3 finish while 0 is still running: whatever commits may not pass offset 0.
    await asyncio.gather(*(c.finish(o, [OutRecord("out", b"r%d" % o)]) for o in (1, 2, 3)))
    assert [offset for _, offset in txns.commits] == [0] * len(txns.commits)
    assert len(txns.commits) <= 2  # the first alone, the rest gathered while it was in flight
    await asyncio.gather(*(c.finish(o, [OutRecord("out", b"r%d" % o)]) for o in (0, 4, 5)))
    assert txns.commits[-1][1] == 6
    assert sorted(v for values, _ in txns.commits for v in values) == [b"r%d" % o for o in range(6)]
    assert len(w) == 0
    assert c.records == 6 and c.transactions == len(txns.commits)


async def test_batches_are_capped() -> None:
    _, txns, c = _running(10, max_batch=3)
    await asyncio.gather(*(c.finish(o, []) for o in range(10)))
    assert all(len(values) == 0 for values, _ in txns.commits)
    assert c.transactions >= 4 and txns.commits[-1][1] == 10


async def test_a_failed_transaction_fails_its_whole_batch_and_finishes_nothing() -> None:
    w, txns, c = _running(3, RecordingTxns(fail=[TransactionAbortedError("timed out")]))
    results = await asyncio.gather(*(c.finish(o, []) for o in range(3)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, TransactionAbortedError)]
    assert failed, results
    assert len(w) == len(failed)  # the failed ones are still unfinished: a retry commits them
    retried = [o for o, r in zip(range(3), results, strict=True) if isinstance(r, BaseException)]
    await asyncio.gather(*(c.finish(o, []) for o in retried))
    assert len(w) == 0 and txns.commits[-1][1] == 3


async def test_close_fails_queued_records_as_not_owned() -> None:
    w, txns, c = _running(2)
    first = asyncio.create_task(c.finish(0, []))
    await asyncio.sleep(0)
    second = asyncio.create_task(c.finish(1, []))
    await asyncio.sleep(0)
    await c.close()
    for task in (first, second):
        with pytest.raises(PartitionNotOwnedError):
            await task
    assert len(w) == 2 and not txns.commits


class ZombieConsumer:
    """A consumer that still lists its old assignment while the coordinator refuses its commits."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    async def committed(self, tp: TopicPartition) -> int:
        return 41

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        from aiokafka.errors import CommitFailedError

        self.commits.append(offsets)
        raise CommitFailedError("the group has rebalanced; this member is not part of it")


async def test_a_zombie_never_starts_a_producer_that_would_fence_the_new_owner() -> None:
    from shared.kafka import PartitionTransactions
    from shared.settings import KafkaSettings

    zombie = ZombieConsumer(TP)
    txns = PartitionTransactions(
        KafkaSettings.from_env({}),
        group_id="g",
        client_id="zombie",
        consumer=zombie,  # type: ignore[arg-type]
    )
    with pytest.raises(PartitionNotOwnedError):
        await txns.producer(TP)  # its producer was dropped (fenced): no new one without proof
    assert zombie.commits == [{TP: 41}]  # the proof asked for: a no-op commit, refused
    assert txns.partitions == frozenset()


async def test_interval_mode_commits_the_offset_once_per_interval_and_when_the_partition_goes_quiet() -> None:
    w, txns, c = _running(5, interval=0.2)
    for o in range(3):  # one after the other: three transactions
        await c.finish(o, [OutRecord("out", b"r%d" % o)])
    # The first carries the offset; the next two, inside the interval, publish records only.
    assert [off for _, off in txns.commits] == [1, -1, -1]
    # Nothing more comes: within the interval the offset is committed alone.
    await asyncio.sleep(0.35)
    assert txns.commits[-1] == ([], 3)
    assert len(w) == 2  # 3 and 4 were never finished
    # An interval after that commit, the next transaction carries the offset again.
    await asyncio.sleep(0.25)
    await c.finish(3, [OutRecord("out", b"r3")])
    assert txns.commits[-1] == ([b"r3"], 4)
    await c.close()


async def test_interval_mode_finishes_a_record_without_outputs_at_once_and_commits_it_later() -> None:
    w, txns, c = _running(3, interval=0.1)
    await asyncio.wait_for(c.finish(0, []), 0.005)  # no transaction to wait for
    await c.finish(1, [])
    assert not txns.commits and len(w) == 1
    await asyncio.sleep(0.25)
    assert txns.commits == [([], 2)]
    await c.close()


async def test_settle_commits_every_finished_offset_now_and_offsets_never_go_back() -> None:
    _, txns, c = _running(4, interval=60.0)
    await c.finish(0, [OutRecord("out", b"r0")])  # carries offset 1
    await c.finish(2, [])
    await c.finish(1, [OutRecord("out", b"r1")])  # inside the interval: no offset
    assert [off for _, off in txns.commits] == [1, -1]
    await c.settle()
    assert txns.commits[-1] == ([], 3)
    offsets = [off for _, off in txns.commits if off >= 0]
    assert offsets == sorted(offsets)
    await c.settle()  # nothing new finished: no transaction
    assert len(txns.commits) == 3
    await c.close()


async def test_a_failed_offset_only_commit_is_retried_an_interval_later_not_in_a_loop() -> None:
    _, txns, c = _running(1, RecordingTxns(fail=[PartitionNotOwnedError(TP)] * 50), interval=0.1)
    await c.finish(0, [])  # finished at once; its offset is committed by the settle timer
    await asyncio.sleep(0.35)
    tried = 50 - len(txns.fail)
    assert 2 <= tried <= 4, tried  # about once per interval
    txns.fail.clear()
    await asyncio.sleep(0.15)
    assert txns.commits == [([], 1)]
    await c.close()


async def test_settle_returns_when_a_close_alongside_cancels_its_flusher() -> None:
    """The rebalance listener and a failed partition preparation can both close a partition:
    one close's settle() waits on the flusher the other close() cancels. That is the end of
    settling, not a cancellation of the waiting task (a reasoning replica died of it in a chaos
    run, inside aiokafka's rebalance)."""

    class Stuck(RecordingTxns):
        async def commit(self, *args: object, **kwargs: object) -> None:
            await asyncio.sleep(3600)

    _, _, c = _running(2, Stuck(), interval=60.0)
    await c.finish(0, [])  # finished, its offset still to commit: settle() starts the flusher
    settling = asyncio.create_task(c.settle(within_s=30.0))
    await asyncio.sleep(0.01)
    await c.close()
    await asyncio.wait_for(settling, 1.0)  # returns, no CancelledError

    _, _, other = _running(2, Stuck(), interval=60.0)
    await other.finish(0, [])
    waiting = asyncio.create_task(other.settle(within_s=30.0))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    waiting.cancel()  # the task itself cancelled: that still propagates
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await other.close()
