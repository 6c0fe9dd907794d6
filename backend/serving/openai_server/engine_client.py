"""lora_llm over tritonserver's gRPC streams (tritonclient's asyncio client): token ids in, token ids out.
Every request streams, so that a stop string or a client that leaves can cancel it at once."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as aio

from backend.errors import code_of
from client.api import make_inputs

OUTPUTS = ("output_ids", "output_log_probs", "finish_reason")
CLOSE_TIMEOUT_S = 5.0  # for tritonserver to close a finished stream


@dataclass
class Piece:
    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str  # "" while more follow


@dataclass
class APIError(Exception):
    """An error as the OpenAI API returns it: {"error": {"message", "type", "param", "code"}}."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


STATUS = {"NOT_FOUND": 404, "INVALID_ARG": 400, "UNAVAILABLE": 503, "CANCELLED": 499, "INTERNAL": 500}


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist", "model", "model_not_found")


def engine_error(message: str, model: str) -> APIError:
    """lora_llm's error (its code read back from the message: Triton's streams carry no code)."""
    code = code_of(message)
    if code == "NOT_FOUND":
        return model_not_found(model)
    return APIError(STATUS[code], message, code=code.lower())


class EngineClient:
    def __init__(self, url: str, model: str = "lora_llm"):
        self.client = aio.InferenceServerClient(url)
        self.model = model

    async def ready(self) -> bool:
        try:
            return await self.client.is_model_ready(self.model)
        except Exception:
            return False

    async def generate(self, ids: list[int], lora_name: str, model: str, inputs: dict) -> AsyncIterator[Piece]:
        """The pieces of one generation as lora_llm streams them; leaving the loop cancels it."""
        tensors = make_inputs(aio, input_ids=ids, lora_name=lora_name or None, stream=True, **inputs)
        wanted = [aio.InferRequestedOutput(name) for name in OUTPUTS]

        async def request():
            yield {"model_name": self.model, "inputs": tensors, "outputs": wanted}

        call = self.client.stream_infer(request())
        ended = False  # lora_llm sent its final response
        try:
            async for result, error in call:
                if error is not None:
                    ended = True
                    raise engine_error(error.message(), model)
                piece = read_piece(result.get_response())
                ended = bool(piece.finish_reason)
                yield piece
                if ended:
                    return
        except grpc.RpcError as e:
            raise APIError(503, f"the engine is unavailable: {e.details() if hasattr(e, 'details') else e}") from e
        finally:
            await end(call, ended)

    async def close(self) -> None:
        await self.client.close()


def read_piece(response) -> Piece:
    """A ModelInferResponse's outputs, read from their raw bytes (tritonclient's as_numpy costs a
    noticeable share of a token's time here). A BYTES element is its 4-byte length, then its bytes."""
    raw = dict(zip((o.name for o in response.outputs), response.raw_output_contents))
    ids = np.frombuffer(raw["output_ids"], np.int64).tolist()
    log_probs = np.frombuffer(raw["output_log_probs"], np.float32).tolist()
    return Piece(ids, log_probs, raw["finish_reason"][4:].decode())


async def end(call, ended: bool) -> None:
    """Cancels a request left unfinished. A finished one's stream is let close: cancelling it (grpc does
    when a call is dropped while open) keeps lora_llm from unloading on Triton 2.51, whose shutdown then
    waits out its exit timeout."""
    if ended:
        try:
            await asyncio.wait_for(drain(call), CLOSE_TIMEOUT_S)
            return
        except (asyncio.TimeoutError, grpc.RpcError):
            pass
    call.cancel()


async def drain(call) -> None:
    async for _ in call:
        pass
