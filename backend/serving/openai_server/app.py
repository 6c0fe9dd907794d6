"""The OpenAI API (FastAPI): /v1/completions, /v1/chat/completions, /v1/models and /health, with the
adapter named in `model`. Tokenizing, the chat template, detokenizing and stop strings happen here;
lora_llm generates. Keeps no state between requests, so replicas need nothing shared."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import format_sse_event
from starlette.responses import StreamingResponse

from backend.errors import RequestError
from backend.naming import CONFIG_FILE, NAME_RE, adapter_folders, lora_key, parse_mix
from backend.serving.openai_server.chat import ChatTemplate, read_template
from backend.serving.openai_server.engine_client import STATUS, APIError, EngineClient, model_not_found
from backend.serving.openai_server.generation import Delta, generate_text
from backend.serving.openai_server.protocol import ChatRequest, CompletionRequest, Generation
from backend.serving.openai_server.settings import Settings
from backend.serving.openai_server.views import ChatView, CompletionView, View
from backend.serving.text import TextCodec

OWNER = "lora-triton"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffers the tokens


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.codec = TextCodec(settings.model_dir)
        template, special = read_template(settings.model_dir)
        self.chat = ChatTemplate(template, special) if template else None
        self.engine: EngineClient | None = None  # made in the server's event loop (gRPC's asyncio binds to it)
        self.started = int(time.time())

    def lora_name(self, model: str) -> str:
        """The adapter a `model` names ("" = the base model); lora_llm tells whether its folder exists."""
        if model == self.settings.base_name:
            return ""
        if NAME_RE.fullmatch(model):
            return model
        if parse_mix(model) is None:
            raise model_not_found(model)
        return lora_key(model)  # a weighted mix of adapters, `a:0.7,b:-0.3`

    def models(self) -> list[dict]:
        base = self.settings.base_name
        listed = [model_card(base, self.started, parent=None)]
        if self.settings.list_adapters:
            for folder in adapter_folders(self.settings.adapter_dir):
                listed.append(model_card(folder.name, int((folder / CONFIG_FILE).stat().st_mtime), parent=base))
        return listed

    def generate(self, body: Generation, ids: list[int], max_tokens: int | None) -> AsyncIterator[Delta]:
        lora = self.lora_name(body.model)
        inputs = body.engine_inputs(max_tokens)
        return generate_text(self.engine, self.codec, ids, lora, body.model, inputs, body.stops)


def model_card(name: str, created: int, parent: str | None) -> dict:
    return dict(id=name, object="model", created=created, owned_by=OWNER, root=name, parent=parent)


def create_app(settings: Settings) -> FastAPI:
    svc = Service(settings)

    @asynccontextmanager
    async def lifespan(app):
        svc.engine = EngineClient(settings.triton_url, settings.engine_model)
        yield
        await svc.engine.close()

    app = FastAPI(title="LoRA adapters on Triton: OpenAI API", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):  # the tokenizer's refusals
        return await api_error(request, APIError(STATUS.get(e.code, 400), e.message))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(bad_request(e.errors()).body(), status_code=400)

    @app.get("/health")
    async def health():
        if await svc.engine.ready():
            return JSONResponse({})
        return JSONResponse(APIError(503, f"{settings.engine_model} is not ready").body(), status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": svc.models()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            ids, prompt = svc.codec.encode_prompt(body.prompt), body.prompt
        else:
            ids, prompt = list(body.prompt), None
        deltas = svc.generate(body, ids, body.max_tokens)
        echo = (prompt if prompt is not None else svc.codec.decode(ids)) if body.echo else ""
        view = CompletionView(svc.codec, body, ids, body.logprobs is not None, echo)
        return await respond(request, body, deltas, view)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if svc.chat is None:
            message = f"the model folder {settings.base_name} has no chat template: use /v1/completions"
            raise APIError(400, message, "messages", "no_chat_template")
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in body.messages]
        try:
            text = svc.chat.render(messages, body.add_generation_prompt)
        except jinja2.TemplateError as e:
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from e
        ids = svc.codec.encode_prompt(text, special=False)  # the template writes its own BOS
        deltas = svc.generate(body, ids, body.max_completion_tokens or body.max_tokens)
        view = ChatView(svc.codec, body, ids, bool(body.logprobs))
        return await respond(request, body, deltas, view)

    return app


def bad_request(errors) -> APIError:
    """pydantic's first error as OpenAI's 400, naming the parameter."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unsupported parameter: '{param}'", param, "unsupported_parameter")
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param, "invalid_value")


async def until_disconnected(request: Request, work: Awaitable):
    """work's result; cancels it (and so the generation) if the client goes first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task not in done:
        task.cancel()
        raise APIError(499, "the client disconnected")
    return task.result()


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def respond(request: Request, body: Generation, deltas: AsyncIterator[Delta], view: View):
    """The whole answer, or a stream of server-sent events. Errors before the first token (an unknown
    model, a bad value, a full queue) become the HTTP status; later ones end the stream with an error event."""
    if not body.stream:
        return JSONResponse(view.body(await until_disconnected(request, collect(deltas))))
    first = await until_disconnected(request, anext(deltas))

    async def events():
        delta = first
        try:
            for chunk in view.opening():
                yield event(chunk)
            while True:
                yield event(view.chunk(delta))
                if delta.finish_reason:
                    break
                delta = await anext(deltas)
            if body.include_usage:
                yield event(view.usage_chunk())
        except APIError as e:
            yield event(e.body())
        finally:
            await deltas.aclose()
        yield format_sse_event(data_str="[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def event(obj: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(obj))


async def collect(deltas: AsyncIterator[Delta]) -> Delta:
    whole = Delta()
    async for d in deltas:
        whole.extend(d)
    return whole
