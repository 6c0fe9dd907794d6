"""A generation request: what the engine is asked for (backend/serving/request_tensors.py parses it)."""

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

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
