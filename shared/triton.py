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
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc  # type: ignore[import-untyped]
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from shared.settings import SettingsError, TritonSettings
from shared.telemetry import mark_error, start_child_span

__all__ = ["ModelCallError", "TritonModel", "make_triton_client"]


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


class TritonModel:
    """Generation on one model of one server: the only place agentbus builds Triton tensors."""

    def __init__(self, client: grpcclient.InferenceServerClient, settings: TritonSettings) -> None:
        self._client = client
        self._settings = settings
        self._extra = extra_sampling(settings)

    @property
    def name(self) -> str:
        return self._settings.triton_model

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

    async def stream(
        self, prompt: str, *, sampling: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[str]:
        """Yield the completion of ``prompt`` piece by piece, as the model streams it.

        Raises:
            ModelCallError: the model answered with an error (``transient=False`` for a bad
                request, ``True`` for unavailable/overloaded), or the deadline passed.
        """
        request = self._request(prompt, True, sampling)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        deadline = timeout_s if timeout_s is not None else self._settings.triton_timeout_s
        # Not made current: this generator yields into its caller's context.
        span = start_child_span(
            "triton.infer",
            attributes={"rpc.system": "grpc", "model": self.name, "prompt.chars": len(prompt)},
        )
        chars = 0
        try:
            async for piece in self._stream(requests(), deadline):
                chars += len(piece)
                yield piece
        except ModelCallError as exc:
            mark_error(span, exc)
            raise
        finally:
            if span is not None:
                span.set_attribute("completion.chars", chars)
                span.end()

    async def _stream(self, requests: AsyncIterator[dict[str, Any]], deadline: float) -> AsyncIterator[str]:
        responses = self._client.stream_infer(requests, stream_timeout=deadline)
        ended = False
        try:
            async with asyncio.timeout(deadline):
                async for result, error in responses:
                    if error is not None:
                        raise _model_error(error)
                    text = result.as_numpy("text_output")
                    if text is not None:
                        for piece in text.reshape(-1):
                            yield piece.decode("utf-8") if isinstance(piece, bytes) else str(piece)
                # The request stream ended after its one request, so the server ends the RPC right
                # after the FINAL response: the stream finishes by itself, nothing to cancel.
                ended = True
        except TimeoutError as exc:
            raise ModelCallError(
                f"model {self.name} gave no final response within {deadline}s", transient=True
            ) from exc
        except InferenceServerException as exc:
            raise _model_error(exc) from exc
        except grpc.aio.AioRpcError as exc:  # the server unreachable or gone mid-stream
            code = exc.code()
            message = f"model call failed ({code.name}): {exc.details()}"
            raise ModelCallError(message, transient=code in _TRANSIENT_CODES) from exc
        finally:
            if not ended:
                # Only a stream given up early is cancelled: cancelling one that is completing races
                # the server's own completion (Triton 2.51 once aborted on it: "ASSERTION FAILED:
                # prior > 0" in gRPC's sync.cc).
                responses.cancel()

    async def generate(
        self, prompt: str, *, sampling: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> str:
        """The whole completion of ``prompt`` (see :meth:`stream` for errors)."""
        return "".join([piece async for piece in self.stream(prompt, sampling=sampling, timeout_s=timeout_s)])

    async def ready(self) -> bool:
        """Whether the server is ready and serves this model."""
        try:
            return bool(await self._client.is_server_ready()) and bool(
                await self._client.is_model_ready(self._settings.triton_model)
            )
        except InferenceServerException:
            return False


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
