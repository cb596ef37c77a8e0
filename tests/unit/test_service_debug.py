"""kill -USR1 <pid>: a replica writes its pending asyncio tasks with their stacks."""

from __future__ import annotations

import asyncio
import io

from shared.service import dump_tasks


async def test_dump_tasks_names_what_each_task_waits_on() -> None:
    gate = asyncio.Event()

    async def waits_on_a_gate() -> None:
        await gate.wait()

    task = asyncio.create_task(waits_on_a_gate(), name="the-stuck-one")
    await asyncio.sleep(0)
    out = io.StringIO()
    try:
        assert dump_tasks(out) >= 2  # this test's task and the stuck one
    finally:
        gate.set()
        await task
    text = out.getvalue()
    assert "---- the-stuck-one" in text
    assert "waits_on_a_gate" in text and "await gate.wait()" in text


def test_tune_gc_raises_the_young_threshold_and_zero_keeps_pythons() -> None:
    import gc

    from shared.service import tune_gc
    from shared.settings import ServiceSettings

    before = gc.get_threshold()
    try:
        tune_gc(ServiceSettings.from_env(gc_gen0_threshold=0))
        assert gc.get_threshold() == before
        tune_gc(ServiceSettings.from_env(gc_gen0_threshold=12345))
        assert gc.get_threshold()[0] == 12345
        assert gc.get_freeze_count() > 0  # start-up objects left out of later passes
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
