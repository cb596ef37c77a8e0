"""Triton on the real server: gRPC asyncio generation from the reference model."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput

from shared.settings import TritonSettings
from shared.triton import ModelCallError, TritonModel, make_triton_client


@contextlib.asynccontextmanager
async def opened_model(settings: TritonSettings) -> AsyncIterator[TritonModel]:
    """A TritonModel on its own client; its stream and the client are closed after."""
    client = make_triton_client(settings)
    model = TritonModel(client, settings)
    try:
        yield model
    finally:
        await model.close()
        await client.close()


async def test_reference_model_answers_text_output_over_grpc_asyncio(triton_settings: TritonSettings) -> None:
    client = make_triton_client(triton_settings)
    try:
        model = TritonModel(client, triton_settings)
        assert await model.ready()
        prompt = "system: be brief\nuser: hello from the test suite"
        answer = await model.generate(prompt)
        assert "hello from the test suite" in answer
        assert answer == await model.generate(prompt), "the reference policy is deterministic"
        long = "user: " + "a long question " * 20
        before = model.responses
        pieces = [p async for p in model.stream(long)]
        assert len(pieces) > 1, "stream=True arrives in several responses"
        assert model.responses - before == len(pieces)
        before = model.responses
        assert await model.generate(long) == "".join(pieces)
        assert model.responses - before == 1, "generate asks for the whole text in one response"
    finally:
        await client.close()


async def test_raw_stream_infer_returns_text_output_tensor(triton_settings: TritonSettings) -> None:
    """The tensor contract itself, without our wrapper: text_input in, text_output out."""
    client = grpcclient.InferenceServerClient(triton_settings.triton_url)
    text = InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"user: ping"], dtype=np.object_))

    async def requests():  # type: ignore[no-untyped-def]
        yield {"model_name": triton_settings.triton_model, "inputs": [text]}

    try:
        outputs = []
        async for result, error in client.stream_infer(requests(), stream_timeout=10):
            assert error is None
            outputs.append(result.as_numpy("text_output")[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        assert len(outputs) == 1
        assert outputs[0].startswith("user: ping"), "exclude_input_in_output defaults to false, as in vLLM"
    finally:
        await client.close()


async def test_unknown_model_is_a_clear_non_transient_error(triton_settings: TritonSettings) -> None:
    settings = TritonSettings.from_env(triton_model="no_such_model")
    client = make_triton_client(settings)
    try:
        with pytest.raises(ModelCallError) as info:
            await TritonModel(client, settings).generate("user: hi", timeout_s=5)
        assert not info.value.transient
    finally:
        await client.close()


async def test_an_unreachable_server_is_a_transient_error(triton_settings: TritonSettings) -> None:
    """Triton restarting (or gone): reasoning must retry the record, never dead-letter it."""
    import dataclasses
    import socket

    import pytest

    from shared.triton import ModelCallError, TritonModel, make_triton_client

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gone = dataclasses.replace(triton_settings, triton_url=f"127.0.0.1:{port}", triton_timeout_s=5.0)
    client = make_triton_client(gone)
    try:
        with pytest.raises(ModelCallError) as caught:
            await TritonModel(client, gone).generate("user: hello")
        assert caught.value.transient, caught.value
    finally:
        await client.close()


async def test_a_completed_stream_ends_without_being_cancelled(triton_settings: TritonSettings) -> None:
    from shared.triton import TritonModel, make_triton_client

    client = make_triton_client(triton_settings)
    try:
        model = TritonModel(client, triton_settings)
        answers = [await model.generate("user: what is 2+3") for _ in range(50)]
        assert len(set(answers)) == 1
        assert await model.ready()  # the server is still up after 50 streams that ended by themselves
    finally:
        await client.close()


# One ModelStreamInfer call per TritonModel, shared by all its generations.


async def _eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


async def _retrying(model: TritonModel, prompt: str, attempts: int = 50) -> str:
    """As reasoning calls the model: a transient error is retried (here every 0.2 s)."""
    for _ in range(attempts - 1):
        try:
            return await model.generate(prompt, timeout_s=5)
        except ModelCallError as exc:
            assert exc.transient, exc
            await asyncio.sleep(0.2)
    return await model.generate(prompt, timeout_s=5)


async def test_concurrent_generations_overlap_on_one_stream(triton_settings: TritonSettings) -> None:
    import time

    async with opened_model(triton_settings) as model:
        prompts = [f"user: question number {i}" for i in range(50)]
        started = time.perf_counter()
        answers = await asyncio.gather(*(model.generate(p, sampling={"latency_ms": 200}) for p in prompts))
        elapsed = time.perf_counter() - started
        for i, answer in enumerate(answers):  # each answer routed to its own caller
            assert f"question number {i}" in answer, (i, answer)
            assert answer == await model.generate(prompts[i])
        assert 0.2 <= elapsed < 2.0, elapsed  # 50 x 200 ms serialised would be 10 s
        assert model.streams_opened == 1
        assert model.in_flight == 0


async def test_a_missed_deadline_leaves_the_shared_stream_working(triton_settings: TritonSettings) -> None:
    async with opened_model(triton_settings) as model:
        slow = asyncio.create_task(model.generate("user: slow one", sampling={"latency_ms": 3000}))
        with pytest.raises(ModelCallError) as caught:
            await model.generate("user: too slow", sampling={"latency_ms": 1500}, timeout_s=0.3)
        assert caught.value.transient
        assert "within 0.3s" in str(caught.value)
        assert model.in_flight == 1  # only the slow one: the late call's entry is gone
        assert "hello again" in await model.generate("user: hello again")
        assert "slow one" in await slow
        await asyncio.sleep(1.5)  # the late answer of the missed call arrives and is dropped
        assert "after that" in await model.generate("user: after that")
        assert model.in_flight == 0
        assert model.streams_opened == 1, "a missed deadline must not cost the stream"


async def test_a_consumer_that_stops_early_leaves_no_routing_entry(triton_settings: TritonSettings) -> None:
    async with opened_model(triton_settings) as model:
        prompt = "user: " + "a long question " * 20
        async for _ in model.stream(prompt):
            assert model.in_flight == 1
            break
        # The abandoned generator is closed by the event loop's asyncgen finalizer, soon.
        await _eventually(lambda: model.in_flight == 0, timeout_s=1.0)
        pieces = model.stream(prompt)
        assert await anext(pieces)
        await pieces.aclose()  # closed explicitly: the entry goes at once
        assert model.in_flight == 0
        assert "long question" in await model.generate(prompt)
        assert model.streams_opened == 1


async def test_a_model_error_is_routed_to_its_own_call(triton_settings: TritonSettings) -> None:
    """Error responses carry their request id: only the bad request fails, non-transiently."""
    async with opened_model(triton_settings) as model:
        good = [model.generate(f"user: fine {i}", sampling={"latency_ms": 100}) for i in range(5)]
        bad = model.generate("user: bad", sampling={"latency_ms": -5})
        *answers, failed = await asyncio.gather(*good, bad, return_exceptions=True)
        assert isinstance(failed, ModelCallError) and not failed.transient
        assert "latency_ms" in str(failed)
        assert [f"fine {i}" in a for i, a in enumerate(answers)] == [True] * 5, answers
        assert model.streams_opened == 1 and model.in_flight == 0


class _Relay:
    """A TCP relay to the real server that can cut every connection through it."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_broken_stream_fails_pending_calls_and_the_next_call_reconnects(
    triton_settings: TritonSettings,
) -> None:
    import dataclasses

    relay = _Relay(triton_settings.triton_url)
    await relay.start()
    settings = dataclasses.replace(
        triton_settings, triton_url=f"127.0.0.1:{relay.port}", triton_timeout_s=10.0
    )
    async with opened_model(settings) as model:
        assert "first" in await model.generate("user: first")
        pending = [
            asyncio.create_task(model.generate(f"user: pending {i}", sampling={"latency_ms": 2000}))
            for i in range(10)
        ]
        await _eventually(lambda: model.in_flight == 10)
        await asyncio.sleep(0.2)  # the requests are on the server
        relay.cut()  # the connection under the stream dies (as when Triton restarts)
        failures = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)
        assert all(isinstance(f, ModelCallError) and f.transient for f in failures), failures
        assert model.in_flight == 0
        # The next call opens a fresh stream (the first may still meet the dying connection).
        assert "again" in await _retrying(model, "user: again")
        settled = model.streams_opened
        assert settled >= 2
        answers = await asyncio.gather(*(model.generate(f"user: more {i}") for i in range(10)))
        assert all(f"more {i}" in a for i, a in enumerate(answers))
        assert model.streams_opened == settled
        await relay.stop()


async def test_a_server_gone_then_back_fails_fast_then_reconnects(triton_settings: TritonSettings) -> None:
    """Nothing listening: each call fails at once (transient), no stream kept; then the server is back."""
    import dataclasses

    relay = _Relay(triton_settings.triton_url)
    await relay.start()
    port = relay.port
    await relay.stop()  # the port is free again: nothing listens
    settings = dataclasses.replace(triton_settings, triton_url=f"127.0.0.1:{port}", triton_timeout_s=10.0)
    async with opened_model(settings) as model:
        for _ in range(3):
            with pytest.raises(ModelCallError) as caught:
                await model.generate("user: anyone there")
            assert caught.value.transient, caught.value
            assert model.in_flight == 0
        opened = model.streams_opened
        assert opened == 3, "one stream per call while the server is gone: no reconnect loop"
        await relay.start(port)
        # gRPC's connect backoff decides when the channel tries again.
        assert "back again" in await _retrying(model, "user: back again")
        assert model.streams_opened > opened
        settled = model.streams_opened
        assert "stays" in await model.generate("user: stays")
        assert model.streams_opened == settled
        await relay.stop()


async def test_close_lets_pending_generations_finish(triton_settings: TritonSettings) -> None:
    async with opened_model(triton_settings) as model:
        pending = [
            asyncio.create_task(model.generate(f"user: closing {i}", sampling={"latency_ms": 300}))
            for i in range(5)
        ]
        await _eventually(lambda: model.in_flight == 5)
        await model.close()  # ends the request stream: the server finishes them, then the call
        assert [f"closing {i}" in t.result() for i, t in enumerate(pending)] == [True] * 5
        stuck = asyncio.create_task(model.generate("user: stuck", sampling={"latency_ms": 5000}))
        await _eventually(lambda: model.in_flight == 1)
        await model.close(wait_s=0.2)  # given up after the wait: transient
        with pytest.raises(ModelCallError) as caught:
            await stuck
        assert caught.value.transient
        assert "after close" in await model.generate("user: after close")
        assert model.streams_opened == 3
        assert await model.ready()


async def test_an_idle_stream_is_ended_cleanly_and_reopened(triton_settings: TritonSettings) -> None:
    """Nothing in flight for idle_close_s: the stream ends (no keepalive GOAWAY cuts it under a call)."""
    async with opened_model(triton_settings) as model:
        model.idle_close_s = 0.3
        assert "one" in await model.generate("user: one")
        await asyncio.sleep(0.1)
        assert "two" in await model.generate("user: two", sampling={"latency_ms": 400})  # busy: not idle
        assert model.streams_opened == 1
        stream = model._current
        assert stream is not None
        await _eventually(lambda: not stream.open, timeout_s=2.0)
        assert model.in_flight == 0
        assert "three" in await model.generate("user: three")
        assert model.streams_opened == 2
