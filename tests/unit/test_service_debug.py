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
