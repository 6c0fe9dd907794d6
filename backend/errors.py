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
