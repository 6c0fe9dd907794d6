"""How the OpenAI API shows a generation: one body (unary) or the chunks of a stream, for completions
and for chat, with usage, log-probs and vLLM's return_token_ids."""

import time
import uuid

from backend.serving.openai_server.generation import Delta
from backend.serving.openai_server.protocol import Generation
from backend.serving.text import TextCodec


class View:
    """How one endpoint shows deltas: a unary body, or chunks of a stream (opening, one per delta, usage)."""

    object = ""
    chunk_object = ""
    prefix = ""  # of the response's id
    prompt_ids_on_choice = True  # vLLM: a completion choice carries its prompt's ids; chat has them on the response

    def __init__(self, codec: TextCodec, body: Generation, prompt_ids: list[int], logprobs: bool):
        self.codec, self.model, self.want_logprobs = codec, body.model, logprobs
        self.prompt_ids, self.prompt_tokens = prompt_ids, len(prompt_ids)
        self.return_token_ids = bool(body.return_token_ids)
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.completion_tokens = 0

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    def body(self, whole: Delta) -> dict:
        self.completion_tokens = len(whole.token_ids)
        return self.with_ids(self.envelope(self.object, [self.choice(whole, True)]), whole) | {"usage": self.usage()}

    def chunk(self, delta: Delta) -> dict:
        self.completion_tokens += len(delta.token_ids)
        return self.with_ids(self.envelope(self.chunk_object, [self.choice(delta, False)]), delta)

    def with_ids(self, response: dict, delta: Delta) -> dict:
        """vLLM's return_token_ids: each delta's ids on its choice, the prompt's once (unary, or the first chunk)."""
        if not self.return_token_ids:
            return response
        choice = response["choices"][0]
        choice["token_ids"] = delta.token_ids
        if self.prompt_ids is not None:
            (choice if self.prompt_ids_on_choice else response)["prompt_token_ids"] = self.prompt_ids
            self.prompt_ids = None
        return response

    def usage_chunk(self) -> dict:
        return self.envelope(self.chunk_object, []) | {"usage": self.usage()}

    def opening(self) -> list[dict]:
        return []

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.codec.decode([t]) for t in ids]

    def choice(self, delta: Delta, final: bool) -> dict:
        raise NotImplementedError


class CompletionView(View):
    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def __init__(self, codec, body, prompt_ids, logprobs, echo: str):
        super().__init__(codec, body, prompt_ids, logprobs)
        self.echo = echo  # the prompt's text, put in front of the answer (echo=true)
        self.offset = len(echo)

    def choice(self, delta: Delta, final: bool) -> dict:
        text = self.echo + delta.text
        self.echo = ""
        logprobs = None
        if self.want_logprobs:
            tokens = self.tokens(delta.token_ids)
            offsets = []
            for t in tokens:
                offsets.append(self.offset)
                self.offset += len(t)
            logprobs = dict(tokens=tokens, token_logprobs=delta.log_probs, top_logprobs=None, text_offset=offsets)
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}


class ChatView(View):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl"
    prompt_ids_on_choice = False

    def opening(self) -> list[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self.envelope(self.chunk_object, [choice])]

    def logprobs(self, delta: Delta) -> dict | None:
        if not self.want_logprobs:
            return None
        content = [
            dict(token=t, logprob=lp, bytes=list(t.encode()), top_logprobs=[])
            for t, lp in zip(self.tokens(delta.token_ids), delta.log_probs)
        ]
        return {"content": content}

    def choice(self, delta: Delta, final: bool) -> dict:
        choice = {"index": 0, "logprobs": self.logprobs(delta), "finish_reason": delta.finish_reason}
        if final:
            return choice | {"message": {"role": "assistant", "content": delta.text}}
        return choice | {"delta": {"content": delta.text} if delta.text else {}}
