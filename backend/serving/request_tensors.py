"""A generation request from the tensors of the lora_llm contract, and the one reader of a single value
from a Triton tensor."""

import math
from collections.abc import Mapping

import numpy as np

from backend.engine.request import MIN_TEMPERATURE, GenerationRequest, Limits, SamplingParams
from backend.errors import invalid
from backend.naming import lora_key


def scalar(tensors: Mapping[str, np.ndarray], name: str, kind: type | None = None, default=None, *, strict=True):
    """The single value of tensors[name] ([1] / [1, 1]) as a Python object (bytes decoded as UTF-8), made
    a `kind` if given; default if absent. strict=False (the text doors): the first of any number of
    values, default if there are none."""
    array = tensors.get(name)
    if array is None or (array.size == 0 and not strict):
        return default
    if strict and array.size != 1:
        raise invalid(f"{name} must hold one value, got shape {list(array.shape)}")
    item = array.reshape(-1)[0]
    if isinstance(item, bytes):
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError as e:
            raise invalid(f"{name} is not valid UTF-8") from e
    elif hasattr(item, "item"):
        item = item.item()
    return item if kind is None else kind(item)


def parse_request(inputs: Mapping[str, np.ndarray], limits: Limits) -> GenerationRequest:
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
    max_tokens = scalar(inputs, "max_tokens", int)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif not 1 <= max_tokens <= limits.max_tokens_limit:
        raise invalid(f"max_tokens must be in [1, {limits.max_tokens_limit}], got {max_tokens}")
    elif max_tokens > room:
        raise invalid(
            f"prompt of {ids.size} tokens + max_tokens {max_tokens} exceeds the context of "
            f"{limits.max_model_len} tokens"
        )

    lora_name = scalar(inputs, "lora_name", str, "")
    if lora_name:
        lora_name = lora_key(lora_name)

    temperature = scalar(inputs, "temperature", float, 0.0)
    top_p = scalar(inputs, "top_p", float, 1.0)
    top_k = scalar(inputs, "top_k", int, 0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise invalid(f"temperature must be >= 0, got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE
    if not 0 < top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise invalid(f"top_k must be >= 0, got {top_k}")
    sampling = SamplingParams(temperature, top_p, top_k, scalar(inputs, "seed", int), *penalties(inputs))
    min_tokens = scalar(inputs, "min_length", int, 0)
    if not 0 <= min_tokens <= max_tokens:
        raise invalid(f"min_length must be in [0, max_tokens={max_tokens}], got {min_tokens}")
    end_id = scalar(inputs, "end_id", int)
    stop_ids = limits.eos_ids if end_id is None else (end_id,)  # end_id -1: none
    stop_ids = tuple(i for i in stop_ids if 0 <= i < limits.vocab_size)
    stream = scalar(inputs, "stream", bool, False)
    return GenerationRequest(
        input_ids=ids.tolist(),
        max_tokens=max_tokens,
        lora_name=lora_name,
        sampling=sampling,
        stop_ids=() if scalar(inputs, "ignore_eos", bool, False) else stop_ids,
        min_tokens=min_tokens,
        stream=stream,
        echo_prompt=not stream and not scalar(inputs, "exclude_input_in_output", bool, True),
    )


def penalties(inputs: Mapping[str, np.ndarray]) -> tuple[float, float, float]:
    """(presence, frequency, repetition): OpenAI's range for the first two, > 0 for the last."""
    presence = scalar(inputs, "presence_penalty", float, 0.0)
    frequency = scalar(inputs, "frequency_penalty", float, 0.0)
    repetition = scalar(inputs, "repetition_penalty", float, 1.0)
    for name, value in [("presence_penalty", presence), ("frequency_penalty", frequency)]:
        if not -2.0 <= value <= 2.0:
            raise invalid(f"{name} must be in [-2, 2], got {value}")
    if not (math.isfinite(repetition) and repetition > 0):
        raise invalid(f"repetition_penalty must be > 0, got {repetition}")
    return presence, frequency, repetition
