"""Triton on the real server: gRPC asyncio generation from the reference model."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput

from shared.settings import TritonSettings
from shared.triton import ModelCallError, TritonModel, make_triton_client


async def test_reference_model_answers_text_output_over_grpc_asyncio(triton_settings: TritonSettings) -> None:
    client = make_triton_client(triton_settings)
    try:
        model = TritonModel(client, triton_settings)
        assert await model.ready()
        prompt = "system: be brief\nuser: hello from the test suite"
        answer = await model.generate(prompt)
        assert "hello from the test suite" in answer
        assert answer == await model.generate(prompt), "the reference policy is deterministic"
        pieces = [p async for p in model.stream("user: " + "a long question " * 20)]
        assert len(pieces) > 1, "stream=True arrives in several responses"
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
