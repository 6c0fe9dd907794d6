"""A generation request, and its validation from the tensors of the lora_llm contract."""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from backend.errors import invalid
from backend.naming import lora_key

_ids = itertools.count()


MIN_TEMPERATURE = 1e-5  # a smaller positive temperature is raised to it: logits / t must stay finite


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    # OpenAI's penalties over the generated tokens (vLLM's formula), transformers' over prompt + output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    default_max_tokens: int
    max_tokens_limit: int
    eos_ids: tuple[int, ...]  # every end-of-turn id of the model (generation_config.eos_token_id)


@dataclass
class GenerationRequest:
    input_ids: list[int]
    max_tokens: int
    lora_name: str = ""  # "" = base model
    sampling: SamplingParams = SamplingParams()
    stop_ids: tuple[int, ...] = ()  # a generated id among them ends the sequence (it is returned)
    min_tokens: int = 0  # the stop ids are masked until this many tokens are generated
    stream: bool = False
    echo_prompt: bool = False  # unary only: output_ids start with the prompt (exclude_input_in_output=false)
    is_cancelled: Callable[[], bool] = lambda: False
    deadline: float | None = None  # time.monotonic() past which the request fails (Triton's request timeout)
    id: int = field(default_factory=lambda: next(_ids))


def _scalar(inputs: dict[str, np.ndarray], name: str, kind: type, default=None):
    value = inputs.get(name)
    if value is None:
        return default
    if value.size != 1:
        raise invalid(f"{name} must hold one value, got shape {list(value.shape)}")
    item = value.reshape(-1)[0]
    if kind is str:
        return item.decode("utf-8", errors="strict") if isinstance(item, bytes) else str(item)
    return kind(item)


def parse_request(inputs: dict[str, np.ndarray], limits: Limits) -> GenerationRequest:
    """inputs: tensor name -> array with the batch dimension (shape [1, ...]) as Triton passes them."""
    ids = inputs.get("input_ids")
    if ids is None or ids.size == 0:
        raise invalid("input_ids is empty")
    if ids.ndim > 2 or (ids.ndim == 2 and ids.shape[0] != 1):
        raise invalid(f"input_ids must be one sequence, got shape {list(ids.shape)}")
    ids = ids.reshape(-1).astype(np.int64)
    bad = ids[(ids < 0) | (ids >= limits.vocab_size)]
    if bad.size:
        raise invalid(f"input_ids holds {bad[0]}, outside the vocabulary [0, {limits.vocab_size})")
    if ids.size >= limits.max_model_len:
        raise invalid(f"prompt of {ids.size} tokens does not fit the context of {limits.max_model_len} tokens")

    room = limits.max_model_len - ids.size
    max_tokens = _scalar(inputs, "max_tokens", int)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif not 1 <= max_tokens <= limits.max_tokens_limit:
        raise invalid(f"max_tokens must be in [1, {limits.max_tokens_limit}], got {max_tokens}")
    elif max_tokens > room:
        raise invalid(
            f"prompt of {ids.size} tokens + max_tokens {max_tokens} exceeds the context of "
            f"{limits.max_model_len} tokens"
        )

    try:
        lora_name = _scalar(inputs, "lora_name", str, "")
    except UnicodeDecodeError as e:
        raise invalid("lora_name is not valid UTF-8") from e
    if lora_name:
        lora_name = lora_key(lora_name)

    temperature = _scalar(inputs, "temperature", float, 0.0)
    top_p = _scalar(inputs, "top_p", float, 1.0)
    top_k = _scalar(inputs, "top_k", int, 0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise invalid(f"temperature must be >= 0, got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE
    if not 0 < top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise invalid(f"top_k must be >= 0, got {top_k}")
    sampling = SamplingParams(temperature, top_p, top_k, _scalar(inputs, "seed", int), *penalties(inputs))
    min_tokens = _scalar(inputs, "min_length", int, 0)
    if not 0 <= min_tokens <= max_tokens:
        raise invalid(f"min_length must be in [0, max_tokens={max_tokens}], got {min_tokens}")
    end_id = _scalar(inputs, "end_id", int)
    stop_ids = limits.eos_ids if end_id is None else (end_id,)  # end_id -1: none
    stop_ids = tuple(i for i in stop_ids if 0 <= i < limits.vocab_size)
    stream = bool(_scalar(inputs, "stream", bool, False))
    return GenerationRequest(
        input_ids=ids.tolist(),
        max_tokens=max_tokens,
        lora_name=lora_name,
        sampling=sampling,
        stop_ids=() if _scalar(inputs, "ignore_eos", bool, False) else stop_ids,
        min_tokens=min_tokens,
        stream=stream,
        echo_prompt=not stream and not _scalar(inputs, "exclude_input_in_output", bool, True),
    )


def penalties(inputs: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """(presence, frequency, repetition): OpenAI's range for the first two, > 0 for the last."""
    presence = _scalar(inputs, "presence_penalty", float, 0.0)
    frequency = _scalar(inputs, "frequency_penalty", float, 0.0)
    repetition = _scalar(inputs, "repetition_penalty", float, 1.0)
    for name, value in [("presence_penalty", presence), ("frequency_penalty", frequency)]:
        if not -2.0 <= value <= 2.0:
            raise invalid(f"{name} must be in [-2, 2], got {value}")
    if not (math.isfinite(repetition) and repetition > 0):
        raise invalid(f"repetition_penalty must be > 0, got {repetition}")
    return presence, frequency, repetition
