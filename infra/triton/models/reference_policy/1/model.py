"""Reference policy: a deterministic stand-in for an LLM behind Triton (Python backend).

It serves the tensor contract of Triton's vLLM backend: ``text_input`` (BYTES, the
prompt) in, ``text_output`` (BYTES) out, with the optional ``stream``,
``sampling_parameters`` (JSON) and ``exclude_input_in_output`` inputs. The model is
decoupled like vLLM's: with ``stream`` set it sends the completion in several
responses, otherwise one; the last response carries the FINAL flag.

The decision logic lives in ``policy.py`` beside this file so it can be unit-tested
without a server.

Latency: the sampling parameter ``latency_ms`` (0..60000) delays the answer by that
long, as a real model's generation time would. The wait happens on a timer thread
(a decoupled model may respond from any thread), so requests in flight overlap the
way they do on a batching GPU server instead of queueing behind each other: this is
the "model that waits" of the benchmarks.
"""

import json
import os
import sys
import threading

# Triton's embedded interpreter ignores PYTHONPATH; the local launcher names the
# environment that has numpy in AGENTBUS_MODEL_PYTHONPATH (the NVIDIA image has it already).
for _path in reversed(os.environ.get("AGENTBUS_MODEL_PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from policy import decide  # noqa: E402


def _optional_scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size == 0:
        return default
    item = value[0]
    return item.decode("utf-8") if isinstance(item, bytes) else item


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt = _optional_scalar(request, "text_input", b"")
                if isinstance(prompt, bytes):
                    prompt = prompt.decode("utf-8", errors="replace")
                stream = bool(_optional_scalar(request, "stream", False))
                exclude_input = bool(_optional_scalar(request, "exclude_input_in_output", False))
                params_text = _optional_scalar(request, "sampling_parameters", "{}") or "{}"
                params = json.loads(params_text)
                completion = decide(prompt, params)
                chunks = _chunks(completion) if stream else [completion if exclude_input else prompt + completion]
                delay_s = _latency_s(params)
            except Exception as exc:  # a bad request gets an error response, never a dead model
                _send_error(sender, exc)
                continue
            if delay_s > 0:
                timer = threading.Timer(delay_s, _send_chunks, (sender, chunks))
                timer.daemon = True
                timer.start()
            else:
                _send_chunks(sender, chunks)
        return None

    def finalize(self):
        pass


def _latency_s(params):
    value = params.get("latency_ms", 0) if isinstance(params, dict) else 0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 60000:
        raise ValueError(f"latency_ms must be a number of milliseconds in 0..60000, not {value!r}")
    return value / 1000.0


def _send_chunks(sender, chunks):
    # The last response carries the FINAL flag (as vLLM's backend does), so a client
    # sees the end without asking for an extra empty response.
    try:
        for i, chunk in enumerate(chunks):
            out = pb_utils.Tensor("text_output", np.array([chunk.encode("utf-8")], dtype=np.object_))
            last = i == len(chunks) - 1
            sender.send(
                pb_utils.InferenceResponse(output_tensors=[out]),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0,
            )
    except Exception as exc:  # the client went away: nothing to tell it
        print(f"reference_policy: sending a response failed: {exc}", file=sys.stderr)


def _send_error(sender, exc):
    error = pb_utils.TritonError(f"reference_policy: {type(exc).__name__}: {exc}")
    sender.send(
        pb_utils.InferenceResponse(output_tensors=[], error=error),
        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )


def _chunks(text, size=48):
    if not text:
        return [""]
    return [text[i : i + size] for i in range(0, len(text), size)]
