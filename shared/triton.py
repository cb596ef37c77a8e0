"""Triton Inference Server client (gRPC asyncio) speaking the LLM tensor contract.

The contract is the one Triton's vLLM backend serves (and TensorRT-LLM's ``ensemble``
accepts with the same names): ``text_input`` (BYTES) in, ``text_output`` (BYTES)
out, optional ``stream`` (BOOL), ``sampling_parameters`` (BYTES, JSON) and
``exclude_input_in_output`` (BOOL). Those models are *decoupled*, so generation goes
over the bidirectional ``ModelStreamInfer`` RPC and ends at the response flagged
``triton_final_response`` (the model sends the FINAL flag with its last response, as
the vLLM backend does; the aio client cannot ask for an extra empty final response).
The reference policy model serves the same contract, so a real LLM replaces it by
configuration alone (``AGENTBUS_TRITON_URL``, ``AGENTBUS_TRITON_MODEL``).

One :class:`TritonModel` multiplexes all its generations over ONE long-lived
``ModelStreamInfer`` call (setting up a call per generation was about half the client's
CPU per generation): requests go in through a queue, each with its own ``request_id``,
and one reader task routes every response to its generation by that id. Triton sends the id
back on every response, error responses included (the aio client's ``stream_infer``
drops it from errors, so the reader takes the raw responses of the call beneath it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import grpc  # type: ignore[import-untyped]
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from shared.settings import SettingsError, TritonSettings
from shared.telemetry import mark_error, start_child_span

__all__ = ["ModelCallError", "TritonModel", "make_triton_client"]

log = logging.getLogger(__name__)


class ModelCallError(RuntimeError):
    """A generation failed: the server answered with an error, timed out or was unreachable."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def make_triton_client(settings: TritonSettings) -> grpcclient.InferenceServerClient:
    """A gRPC asyncio client of ``settings.triton_url`` with keepalive suited to long streams."""
    keepalive = grpcclient.KeepAliveOptions(
        keepalive_time_ms=30000, keepalive_timeout_ms=10000, keepalive_permit_without_calls=True
    )
    return grpcclient.InferenceServerClient(url=settings.triton_url, keepalive_options=keepalive)


def _scalar(name: str, value: Any, datatype: str) -> InferInput:
    tensor = InferInput(name, [1], datatype)
    dtype = np.object_ if datatype == "BYTES" else np.bool_
    tensor.set_data_from_numpy(np.array([value], dtype=dtype))
    return tensor


class _Broken:
    """What a pending generation receives when the stream under it failed or ended."""

    __slots__ = ("message", "transient")

    def __init__(self, message: str, transient: bool) -> None:
        self.message = message
        self.transient = transient


class _Stream:
    """One ``ModelStreamInfer`` call shared by all the generations of a :class:`TritonModel`.

    Requests go in through ``_requests`` (``None`` ends the request iterator: gRPC then
    half-closes, and the server ends the call once its answers are out). One reader task
    puts every response into the inbox of its request id; the generation itself decides
    when it has ended (error or FINAL flag) and removes its inbox, so a response for an id
    that has no inbox any more (its generation timed out or was abandoned) is dropped.
    When the call fails or ends, every pending generation gets a :class:`_Broken` and the
    stream takes no more requests: the model's next generation opens a new one.

    A stream left with nothing in flight for ``idle_s`` is ended the same clean way. An
    idle stream would otherwise be cut under a later call: Triton's gRPC server (defaults)
    answers the client's keepalive pings on a connection it sends nothing on with a
    GOAWAY "too_many_pings" after about two minutes, and proxies time idle streams out.

    Only decoupled models (the LLM contract) suit one shared stream: Triton writes the
    responses of a non-decoupled model in request order, so one slow request would hold
    back the answers behind it.
    """

    def __init__(self, client: grpcclient.InferenceServerClient, name: str, idle_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._requests: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.pending: dict[str, asyncio.Queue[Any]] = {}
        self.open = True
        self._given_up = False
        self._idle_s = idle_s
        self._idle_since = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._call = client.stream_infer(self._outgoing(), stream_timeout=None)
        self._reader = asyncio.create_task(self._read(), name=f"triton-stream[{name}]")

    async def _outgoing(self) -> AsyncIterator[dict[str, Any]]:
        while (request := await self._requests.get()) is not None:
            yield request

    def submit(self, request: dict[str, Any]) -> asyncio.Queue[Any]:
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.pending[request["request_id"]] = inbox
        self._requests.put_nowait(request)
        return inbox

    def forget(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
        if not self.pending and self.open:
            self._idle_since = self._loop.time()
            if self._idle_timer is None:
                self._idle_timer = self._loop.call_later(self._idle_s, self._end_if_idle)

    def _end_if_idle(self) -> None:
        self._idle_timer = None
        if not self.open or self.pending:
            return  # the generation in flight reschedules this when it ends
        idle_for = self._loop.time() - self._idle_since
        if idle_for < self._idle_s:
            self._idle_timer = self._loop.call_later(self._idle_s - idle_for, self._end_if_idle)
            return
        self.end()

    def end(self) -> None:
        """Take no more requests; the server ends the call once the pending ones are answered."""
        if self.open:
            self.open = False
            self._requests.put_nowait(None)

    def _responses(self) -> AsyncIterator[Any]:
        # The raw ModelStreamInferResponse messages: the aio client's own iterator turns an error
        # response into an InferenceServerException without its id, which a shared stream needs.
        raw = getattr(self._call, "_grpc_call", None)
        return raw.__aiter__() if raw is not None else _rewrapped(self._call)

    async def _read(self) -> None:
        broken = _Broken("model stream ended", transient=True)
        try:
            async for response in self._responses():
                request_id = response.infer_response.id
                inbox = self.pending.get(request_id)
                if inbox is not None:
                    inbox.put_nowait(response)
                elif not request_id and response.error_message:
                    # Triton names the request in every response, errors included; an error that
                    # names none cannot be told apart from a late answer to an abandoned call, so
                    # it is not pinned on anyone: its generation ends at its deadline (transient).
                    log.warning("a model error without a request id was dropped: %s", response.error_message)
        except grpc.aio.AioRpcError as exc:  # the server unreachable, restarted or gone
            code = exc.code()
            broken = _Broken(f"model call failed ({code.name}): {exc.details()}", code in _TRANSIENT_CODES)
        except asyncio.CancelledError:
            what = "closed before its answer came" if self._given_up else "cancelled (channel closed)"
            broken = _Broken(f"model stream {what}", transient=True)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task cancelled, not just the call (closed channel): the finally still runs
        except Exception as exc:  # anything else: the stream is unusable, its callers retry
            log.exception("model stream failed")
            broken = _Broken(f"model stream failed: {exc!r}", transient=True)
        finally:
            self.end()  # also ends the request iterator, so gRPC's writer task ends too
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            if self.pending:
                log.warning(
                    "model stream broke with %d generations pending: %s", len(self.pending), broken.message
                )
            for inbox in self.pending.values():
                inbox.put_nowait(broken)
            self.pending.clear()

    async def close(self, wait_s: float) -> None:
        self.end()
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), wait_s)
        except TimeoutError:
            # Generations still in flight after the wait: the stream is given up, not completing.
            self._given_up = True
            self._call.cancel()
            await self._reader


async def _rewrapped(responses: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The aio client's ``(result, error)`` pairs as responses again (an error then has no id)."""
    async for result, error in responses:
        if error is not None:
            yield pb.ModelStreamInferResponse(error_message=error.message() or str(error))
        else:
            yield pb.ModelStreamInferResponse(infer_response=result.get_response())


class TritonModel:
    """Generation on one model of one server: the only place agentbus builds Triton tensors.

    All its generations share one ``ModelStreamInfer`` call, opened on first use and
    again after it failed or idled ``idle_close_s``; :meth:`close` ends it.
    """

    #: Seconds with nothing in flight after which the shared stream is ended (cleanly, by
    #: ending its requests); below the client's 30 s keepalive ping, see :class:`_Stream`.
    idle_close_s: float = 20.0

    def __init__(self, client: grpcclient.InferenceServerClient, settings: TritonSettings) -> None:
        self._client = client
        self._settings = settings
        self._extra = extra_sampling(settings)
        self._current: _Stream | None = None
        self._streams_opened = 0
        self.responses = 0
        """Model responses received (one per piece when streamed, else one per generation)."""

    @property
    def name(self) -> str:
        return self._settings.triton_model

    @property
    def streams_opened(self) -> int:
        """How many ``ModelStreamInfer`` calls this model has opened (one, unless one broke)."""
        return self._streams_opened

    @property
    def in_flight(self) -> int:
        """Generations waiting on the current stream (each has a routing entry until it ends)."""
        stream = self._current
        return len(stream.pending) if stream is not None and stream.open else 0

    def sampling_parameters(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_tokens": self._settings.triton_max_tokens,
            "temperature": self._settings.triton_temperature,
        }
        params.update(self._extra)
        params.update(overrides or {})
        return params

    def _request(self, prompt: str, stream: bool, sampling: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "model_name": self._settings.triton_model,
            "inputs": [
                _scalar("text_input", prompt.encode("utf-8"), "BYTES"),
                _scalar("stream", stream, "BOOL"),
                _scalar(
                    "sampling_parameters", json.dumps(self.sampling_parameters(sampling)).encode(), "BYTES"
                ),
                _scalar("exclude_input_in_output", True, "BOOL"),
            ],
            "outputs": [InferRequestedOutput("text_output")],
            "request_id": uuid.uuid4().hex,
        }

    def stream(
        self, prompt: str, *, sampling: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[str]:
        """Yield the completion of ``prompt`` piece by piece, as the model streams it.

        Raises:
            ModelCallError: the model answered with an error (``transient=False`` for a bad
                request, ``True`` for unavailable/overloaded), or the deadline passed.
        """
        return self._generation(prompt, True, sampling, timeout_s)

    async def _generation(
        self, prompt: str, streamed: bool, sampling: Mapping[str, Any] | None, timeout_s: float | None
    ) -> AsyncIterator[str]:
        request = self._request(prompt, streamed, sampling)
        deadline = timeout_s if timeout_s is not None else self._settings.triton_timeout_s
        # Not made current: this generator yields into its caller's context.
        span = start_child_span(
            "triton.infer",
            attributes={"rpc.system": "grpc", "model": self.name, "prompt.chars": len(prompt)},
        )
        chars = 0
        try:
            # aclosing: a caller that stops early closes _stream now, which removes its routing entry.
            async with contextlib.aclosing(self._stream(request, deadline)) as pieces:
                async for piece in pieces:
                    chars += len(piece)
                    yield piece
        except ModelCallError as exc:
            mark_error(span, exc)
            raise
        finally:
            if span is not None:
                span.set_attribute("completion.chars", chars)
                span.end()

    def _open_stream(self) -> _Stream:
        stream = self._current
        if stream is None or not stream.open:
            # Only a generation opens a stream (never a loop of reconnects): while the server is
            # down each call fails at once, UNAVAILABLE, and gRPC's channel backs off connecting.
            stream = _Stream(self._client, self.name, self.idle_close_s)
            self._current = stream
            self._streams_opened += 1
        return stream

    async def _stream(self, request: dict[str, Any], deadline: float) -> AsyncGenerator[str, None]:
        expires = asyncio.get_running_loop().time() + deadline
        try:
            stream = self._open_stream()
        except InferenceServerException as exc:
            raise _model_error(exc) from exc
        request_id: str = request["request_id"]
        inbox = stream.submit(request)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(expires):
                        item = await inbox.get()
                except TimeoutError as exc:
                    # Only this generation stops waiting: the shared stream goes on, and the answers
                    # still to come for this id are dropped (its entry goes in the finally below).
                    raise ModelCallError(
                        f"model {self.name} gave no final response within {deadline}s", transient=True
                    ) from exc
                if isinstance(item, _Broken):
                    raise ModelCallError(item.message, transient=item.transient)
                if item.error_message:
                    # An error ends its generation, FINAL flag or not (Triton answers a request it
                    # refuses, e.g. for an unknown model, with one error response without the flag).
                    raise _model_error(InferenceServerException(msg=item.error_message))
                self.responses += 1
                response = item.infer_response
                text = InferResult(response).as_numpy("text_output")
                if text is not None:
                    for piece in text.reshape(-1):
                        yield piece.decode("utf-8") if isinstance(piece, bytes) else str(piece)
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        finally:
            stream.forget(request_id)

    async def generate(
        self, prompt: str, *, sampling: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> str:
        """The whole completion of ``prompt`` (see :meth:`stream` for errors).

        Asked for with ``stream`` false: the model answers once, with the whole text and the
        final flag, instead of one response per piece (each a gRPC message, a hop through
        grpc.aio's poller thread and a decode here, and a send from the model).
        """
        return "".join([piece async for piece in self._generation(prompt, False, sampling, timeout_s)])

    async def ready(self) -> bool:
        """Whether the server is ready and serves this model."""
        try:
            return bool(await self._client.is_server_ready()) and bool(
                await self._client.is_model_ready(self._settings.triton_model)
            )
        except InferenceServerException:
            return False

    async def close(self, wait_s: float = 5.0) -> None:
        """End the shared stream; call it before closing the client.

        The request iterator ends, so the server ends the call by itself once its answers
        are out (a completing stream is never cancelled: Triton 2.51 once aborted on that,
        "ASSERTION FAILED: prior > 0" in gRPC's sync.cc). Generations still pending after
        ``wait_s`` are given up: the call is cancelled and they fail (transient). A later
        generation opens a new stream.
        """
        stream, self._current = self._current, None
        if stream is not None:
            await stream.close(wait_s)


_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)


def extra_sampling(settings: TritonSettings) -> dict[str, Any]:
    """``AGENTBUS_TRITON_SAMPLING`` parsed.

    Raises:
        SettingsError: it is not a JSON object.
    """
    text = settings.triton_sampling.strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SettingsError(f"AGENTBUS_TRITON_SAMPLING is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise SettingsError("AGENTBUS_TRITON_SAMPLING must be a JSON object")
    return value


def _model_error(error: InferenceServerException) -> ModelCallError:
    status = str(error.status() or "")
    message = error.message() or str(error)
    transient = any(code in status for code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"))
    return ModelCallError(f"model call failed ({status or 'error'}): {message}", transient=transient)
