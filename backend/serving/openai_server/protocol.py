"""Request bodies of the OpenAI API as pydantic models. A field we do not serve is refused by name
(extra="forbid"), and so is a value of a known field that we would otherwise have to ignore."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.serving.text import MAX_STOP_STRINGS

# field -> (the values served, why others are not): a field we would otherwise have to ignore
ONLY = {
    "n": ((None, 1), "only n=1 is supported"),
    "best_of": ((None, 1), "only best_of=1 is supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "suffix": ((None, ""), "suffix is not supported"),
    "logprobs": ((None, 0, False, True), "only logprobs=0 is supported: the chosen token's log-probability"),
    "top_logprobs": ((None, 0), "top_logprobs above 0 is not supported: logprobs gives the chosen token's"),
    # SGLang's defaults, which sglang-router and vllm-router add to every body they forward
    "no_stop_trim": ((None, False), "stop strings are always trimmed"),
    "skip_special_tokens": ((None, True), "special tokens are always skipped"),
    "return_hidden_states": ((None, False), "return_hidden_states is not supported"),
    "continue_final_message": ((None, False), "continue_final_message is not supported"),
    "separate_reasoning": ((None, True), "no reasoning parser: reasoning is not separated"),
    "stream_reasoning": ((None, True), "no reasoning parser: reasoning is not separated"),
    "include_reasoning": ((None, True), "no reasoning parser: reasoning is not separated"),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class Generation(Strict):
    """What /v1/completions and /v1/chat/completions share; vLLM's extensions are marked."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)  # OpenAI's default: 1
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 = off
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM
    min_tokens: int | None = Field(None, ge=0)  # vLLM
    ignore_eos: bool | None = None  # vLLM
    return_token_ids: bool | None = None  # vLLM: the ids of the prompt and of each delta beside the text
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted; nothing is done with it
    logit_bias: dict[str, float] | None = None
    no_stop_trim: bool | None = None  # SGLang's, as routers forward them (ONLY)
    skip_special_tokens: bool | None = None
    return_hidden_states: bool | None = None

    @field_validator(*ONLY, check_fields=False)
    @classmethod
    def _only(cls, v, info):
        served, why = ONLY[info.field_name]
        if not any(v == ok and type(v) is type(ok) for ok in served):
            raise ValueError(f"{why}, got {v!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        return stops

    @property
    def stops(self) -> list[str]:
        return self.stop or []

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def engine_inputs(self, max_tokens: int | None) -> dict:
        """lora_llm's inputs for these settings (None = leave out: the engine's default)."""
        top_k = self.top_k if self.top_k and self.top_k > 0 else None
        return dict(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p,
            top_k=top_k,
            seed=None if self.seed is None else self.seed % 2**64,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_length=self.min_tokens,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError(f"one prompt per request is supported, got {len(v)}")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(Strict):
    type: Literal["text"]


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True  # vLLM
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    continue_final_message: bool | None = None  # SGLang's, as routers forward them (ONLY)
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None
    include_reasoning: bool | None = None
