import re
from dataclasses import dataclass


@dataclass
class RequestError(Exception):
    """An error that belongs to one request; `code` is a Triton error code name."""

    code: str  # INVALID_ARG | NOT_FOUND | UNAVAILABLE | CANCELLED | INTERNAL
    message: str

    def __str__(self) -> str:
        return self.message


def invalid(message: str) -> RequestError:
    return RequestError("INVALID_ARG", message)


def not_found(adapter: str) -> RequestError:
    return RequestError("NOT_FOUND", f"LoRA adapter '{adapter}' not found")


def unavailable(message: str = "the model is shutting down") -> RequestError:
    return RequestError("UNAVAILABLE", message)


def engine_stopped() -> RequestError:
    return unavailable("the engine is not running (see the server log)")


def device_failed(reason: str) -> RequestError:
    return unavailable(f"the engine is not running: the GPU failed ({reason}); the server is restarting")


def deadline_exceeded() -> RequestError:
    return unavailable("the request's timeout expired")


def cancelled() -> RequestError:
    return RequestError("CANCELLED", "request cancelled")


def internal(message: str) -> RequestError:
    return RequestError("INTERNAL", f"internal error: {message}")


_CODES = [
    ("NOT_FOUND", r"LoRA adapter '.*' not found"),
    ("UNAVAILABLE", r"the model is shutting down|the engine (is not running|queue is full).*"),
    ("UNAVAILABLE", r"the request's timeout expired"),
    ("UNAVAILABLE", r".*(Server is stopping|Stub process .* is not healthy|lora_llm's stub process died).*"),
    ("CANCELLED", cancelled().message),
    ("INTERNAL", r"(internal error|Failed to process the request).*"),
]


def code_of(message: str) -> str:
    """The code of one of our error messages. Triton's BLS hands every error on as INTERNAL
    (triton-inference-server/server#7804): lora_text gets the code back from the message."""
    for code, pattern in _CODES:
        if re.fullmatch(pattern, message, re.S):
            return code
    return "INVALID_ARG"
