"""Calling the model repository with tritonclient: unary text over HTTP or gRPC, streamed text and
token ids over gRPC."""

import queue
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

DTYPES = {
    "lora_name": ("BYTES", np.object_),
    "max_tokens": ("INT32", np.int32),
    "temperature": ("FP32", np.float32),
    "top_p": ("FP32", np.float32),
    "top_k": ("INT32", np.int32),
    "seed": ("UINT64", np.uint64),
    "end_id": ("INT32", np.int32),
    "stream": ("BOOL", np.bool_),
    "exclude_input_in_output": ("BOOL", np.bool_),
    "stream_whole_chars": ("BOOL", np.bool_),
    "text_input": ("BYTES", np.object_),
    "min_length": ("INT32", np.int32),
    "presence_penalty": ("FP32", np.float32),
    "frequency_penalty": ("FP32", np.float32),
    "repetition_penalty": ("FP32", np.float32),
    "ignore_eos": ("BOOL", np.bool_),
    "stop_words": ("BYTES", np.object_),  # a list of strings
}


@dataclass
class Chunk:
    """One response: text (text models) or token ids and their log-probs (lora_llm)."""

    text: str = ""
    token_ids: list[int] | None = None
    log_probs: list[float] | None = None
    finish_reason: str = ""
    adapter_version: str = ""  # content hash of the adapter version that served it
    engine_step: int = 0  # lora_llm: the engine step in which its last token was sampled


def make_inputs(module, **values) -> list:
    """values (None = leave out) -> InferInputs of the tensor contract, each with its batch dim [1, n]."""
    inputs = []
    for name, value in values.items():
        if value is None:
            continue
        if name == "input_ids":
            array = np.asarray(value, dtype=np.int64).reshape(1, -1)
            triton_type = "INT64"
        else:
            triton_type, dtype = DTYPES[name]
            values = value if isinstance(value, list) else [value]
            array = np.array([[v.encode() if isinstance(v, str) else v for v in values]], dtype=dtype)
        tensor = module.InferInput(name, list(array.shape), triton_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def client_for(url: str, protocol: str):
    module = grpcclient if protocol == "grpc" else httpclient
    return module, module.InferenceServerClient(url)


def to_chunk(result) -> Chunk:
    def get(name):
        return result.as_numpy(name)

    text = get("text_output")
    ids = get("output_ids")
    logp = get("output_log_probs")
    reason = get("finish_reason")
    version = get("adapter_version")
    step = get("engine_step")
    return Chunk(
        text=text.reshape(-1)[0].decode() if text is not None else "",
        token_ids=ids.reshape(-1).tolist() if ids is not None else None,
        log_probs=logp.reshape(-1).tolist() if logp is not None else None,
        finish_reason=reason.reshape(-1)[0].decode() if reason is not None else "",
        adapter_version=version.reshape(-1)[0].decode() if version is not None else "",
        engine_step=int(step.reshape(-1)[0]) if step is not None else 0,
    )


def infer(url: str, protocol: str, model: str, **values) -> Chunk:
    """One unary call (a non-decoupled model, e.g. lora_text), over "http" or "grpc"."""
    module, client = client_for(url, protocol)
    try:
        return to_chunk(client.infer(model, make_inputs(module, **values)))
    finally:
        client.close()


def stream(url: str, model: str, timeout: float = 300.0, **values) -> Iterator[Chunk]:
    """Responses of one request to a decoupled model (lora_llm, ensemble) over a gRPC stream, as they
    arrive. Raises InferenceServerException on an error response."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    done = False
    try:
        client.async_stream_infer(model, make_inputs(grpcclient, **values), enable_empty_final_response=True)
        while not done:
            result, error = results.get(timeout=timeout)
            if error is not None:
                done = True
                raise error
            response = result.get_response()
            done = response.parameters["triton_final_response"].bool_param
            if response.outputs:
                yield to_chunk(result)
    finally:
        # Cancel only a request left unfinished: cancelling a finished ensemble request keeps the
        # ensemble from unloading on Triton 2.51 (the server then waits out its exit timeout).
        client.stop_stream(cancel_requests=not done)
        client.close()


def join(whole: Chunk, chunk: Chunk) -> Chunk:
    whole.text += chunk.text
    whole.token_ids = (whole.token_ids or []) + (chunk.token_ids or [])
    whole.log_probs = (whole.log_probs or []) + (chunk.log_probs or [])
    whole.finish_reason = chunk.finish_reason or whole.finish_reason
    whole.adapter_version = chunk.adapter_version or whole.adapter_version
    whole.engine_step = chunk.engine_step
    return whole


def generate(url: str, model: str, **values) -> Chunk:
    """All chunks of a streamed (or single-response) call joined into one."""
    whole = Chunk(token_ids=[], log_probs=[])
    for chunk in stream(url, model, **values):
        join(whole, chunk)
    return whole


def generate_in_order(url: str, model: str, requests: list[dict], timeout: float = 300.0) -> list[Chunk]:
    """Several requests sent in this order on one gRPC stream (so they reach the server in this order),
    each one's responses joined. Raises InferenceServerException on an error response."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    joined = {str(i): Chunk(token_ids=[], log_probs=[]) for i in range(len(requests))}
    pending = set(joined)
    try:
        for rid, values in zip(joined, requests):
            inputs = make_inputs(grpcclient, **values)
            client.async_stream_infer(model, inputs, request_id=rid, enable_empty_final_response=True)
        while pending:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise error
            response = result.get_response()
            if response.outputs:
                join(joined[response.id], to_chunk(result))
            if response.parameters["triton_final_response"].bool_param:
                pending.discard(response.id)
    finally:
        client.stop_stream(cancel_requests=bool(pending))
        client.close()
    return list(joined.values())


def routing_headers(model: str) -> dict[str, str]:
    """The header vllm-router hashes on (backend/cluster.py), keyed by the adapter: all of one adapter's requests
    reach one replica. For the openai SDK: create(model=m, ..., extra_headers=routing_headers(m))."""
    return {"x-session-id": model}


__all__ = [
    "Chunk",
    "InferenceServerException",
    "generate",
    "generate_in_order",
    "infer",
    "make_inputs",
    "routing_headers",
    "stream",
]
