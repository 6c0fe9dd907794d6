"""The OpenAI server (its own process, python -m backend.serving.openai_server) in front of the session's real
tritonserver, driven by the official `openai` SDK; greedy outputs checked against PEFT."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest
from transformers import AutoTokenizer

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from backend.serving.text import TextCodec
from client.server import OpenAIServer, free_port, http_status, terminate
from tests.conftest import ADAPTERS, MIX, peft_generate
from tests.test_server import mixed_requests, wait_idle

EOS = 2  # the test tokenizer's </s>: the base model's end of turn
MAX_TOKENS = 12
RETURN_IDS = {"return_token_ids": True}  # vLLM's extension: the ids beside the text
# A chat template in the style of Llama-2's: special tokens as text, the system prompt inside the first turn
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>> {{ m['content'] }} <</SYS>> "
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]{% else %} {{ m['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %} Answer:{% endif %}"
)


@pytest.fixture(scope="module")
def api(server, assets, tmp_path_factory):
    """The OpenAI server on the session's base folder (no chat template); the SDK pointed at it."""
    log = tmp_path_factory.mktemp("openai") / "openai.log"
    with OpenAIServer(server.grpc_url, assets / "base", assets / "adapters", log_path=log) as front:
        yield openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def chat_dir(assets, tmp_path_factory):
    """The base folder with a chat template in its tokenizer_config.json (the weights are lora_llm's)."""
    folder = tmp_path_factory.mktemp("chat") / "base"
    shutil.copytree(assets / "base", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def chat_api(server, assets, chat_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai-chat") / "openai.log"
    args = ["--served-model-name", "chat-base", "--no-list-adapters"]
    with OpenAIServer(server.grpc_url, chat_dir, assets / "adapters", args, log_path=log) as front:
        yield openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def codec(assets) -> TextCodec:
    return TextCodec(assets / "base")


def model_of(adapter: str, base: str = "base") -> str:
    return adapter or base


def test_models_list_the_base_and_the_adapters_on_disk(api, chat_api):
    models = {m.id: m for m in api.models.list()}
    assert set(models) == {"base", *ADAPTERS}
    assert models["base"].owned_by and getattr(models["base"], "parent", None) is None
    assert all(getattr(models[name], "parent", None) == "base" for name in ADAPTERS)
    assert [m.id for m in chat_api.models.list()] == ["chat-base"]  # --no-list-adapters


@pytest.mark.parametrize("adapter", ["", *ADAPTERS])
def test_completions_equal_peft(api, peft_model, codec, adapter):
    """A text prompt and the same prompt as token ids: greedy text and usage equal PEFT's generate."""
    prompt = "Beautiful is better than"
    ids = codec.encode(prompt)
    ref = peft_generate(peft_model, ids, adapter, MAX_TOKENS, EOS)
    for given in (prompt, ids):
        out = api.completions.create(
            model=model_of(adapter), prompt=given, max_tokens=MAX_TOKENS, temperature=0, extra_body=RETURN_IDS
        )
        assert out.choices[0].token_ids == ref and out.choices[0].prompt_token_ids == ids
        assert out.choices[0].text == codec.decode(ref)
        assert out.choices[0].finish_reason == ("stop" if ref[-1] == EOS else "length")
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(ref))
        assert out.usage.total_tokens == len(ids) + len(ref) and out.model == model_of(adapter)


def test_a_weighted_mix_in_model_equals_peft(api, peft_mix, codec):
    ids = codec.encode("Beautiful is better than")
    out = api.completions.create(model=MIX, prompt=ids, max_tokens=MAX_TOKENS, temperature=0, extra_body=RETURN_IDS)
    assert out.choices[0].token_ids == peft_generate(peft_mix, ids, "mix", MAX_TOKENS, EOS)
    with pytest.raises(openai.BadRequestError, match="LoRA mix 'qv-r4:x': the weight 'x' of 'qv-r4' is not a number"):
        api.completions.create(model="qv-r4:x", prompt=ids, max_tokens=2)


def test_logprobs_and_echo(api, peft_model, codec):
    ids = [1, 30, 31, 32]
    ref = peft_generate(peft_model, ids, "qv-r4", 6, EOS)
    out = api.completions.create(model="qv-r4", prompt=ids, max_tokens=6, temperature=0, logprobs=0, echo=True)
    choice = out.choices[0]
    assert choice.text == codec.decode(ids) + codec.decode(ref)
    assert len(choice.logprobs.token_logprobs) == len(ref) and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert choice.logprobs.tokens == [codec.decode([t]) for t in ref]


@pytest.mark.parametrize("adapter", ["", "all-r16-pattern"])
def test_streaming_equals_unary(api, adapter):
    values = dict(model=model_of(adapter), prompt="Now is better than", max_tokens=MAX_TOKENS, temperature=0)
    unary = api.completions.create(extra_body=RETURN_IDS, **values)
    chunks = list(api.completions.create(stream=True, stream_options={"include_usage": True}, **values))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and all(texts)
    assert "".join(texts) == unary.choices[0].text
    with_ids = list(api.completions.create(stream=True, extra_body=RETURN_IDS, **values))
    assert sum((c.choices[0].token_ids for c in with_ids), []) == unary.choices[0].token_ids
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + [
        unary.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage
    assert len({c.id for c in chunks}) == 1


def test_chat_through_the_chat_template(chat_api, chat_dir, peft_model, codec):
    """The template is rendered as transformers renders it; the answer, unary and streamed, equals PEFT's
    greedy generation from those ids."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Beautiful is better than"}]
    ids = AutoTokenizer.from_pretrained(chat_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids.count(1) == 1, "the BOS the template writes must not be doubled"
    for adapter in ["", "qv-r4"]:
        ref = peft_generate(peft_model, ids, adapter, MAX_TOKENS, EOS)
        values = dict(model=model_of(adapter, "chat-base"), messages=messages, max_completion_tokens=MAX_TOKENS)
        out = chat_api.chat.completions.create(temperature=0, **values)
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == codec.decode(ref)
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(ref))
        chunks = list(chat_api.chat.completions.create(temperature=0, stream=True, **values))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == codec.decode(ref)
        assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    logprobs = chat_api.chat.completions.create(temperature=0, logprobs=True, top_logprobs=0, **values)
    assert len(logprobs.choices[0].logprobs.content) == logprobs.usage.completion_tokens


def test_chat_without_a_template_is_a_clear_400(api):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        api.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])
    assert api.completions.create(model="base", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_an_unknown_model_is_404_naming_it_alone(api):
    for name in ["no-such-adapter", "../etc"]:
        with pytest.raises(openai.NotFoundError) as e:
            api.completions.create(model=name, prompt="hi", max_tokens=2)
        assert e.value.body["message"] == f"The model '{name}' does not exist"
        assert e.value.body["param"] == "model" and not any(a in str(e.value.body) for a in ADAPTERS)
    with pytest.raises(openai.NotFoundError):
        list(api.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2, stream=True))


BAD = {
    "negative temperature": (dict(temperature=-1), "temperature"),
    "top_p 0": (dict(top_p=0), "top_p"),
    "n 2": (dict(n=2), "n"),
    "5 stop strings": (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    "an unsupported parameter": (dict(extra_body={"guided_json": {}}), "guided_json"),
    "top logprobs": (dict(logprobs=2), "logprobs"),
    "presence_penalty 3": (dict(presence_penalty=3), "presence_penalty"),
    "repetition_penalty 0": (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    "min_tokens above max_tokens": (dict(extra_body={"min_tokens": 5}), None),
    "max_tokens above the limit": (dict(max_tokens=100_000), None),
    "prompt longer than the context": (dict(prompt="Beautiful is better than ugly. " * 100), None),
    "id outside the vocabulary": (dict(prompt=[1, 10**6]), None),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_values_are_400(api, case):
    values, param = BAD[case]
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(**({"model": "qv-r4", "prompt": "hi", "max_tokens": 3} | values))
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    if param:
        assert e.value.body["param"] == param and param in e.value.body["message"]


def test_stop_strings(api, server):
    """The text ends before the first stop string generated; one that only the prompt holds does not
    count; finish_reason is stop and the generation stops there."""
    prompt = "Beautiful is better than"
    values = dict(model="mlp-r64", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = api.completions.create(**values).choices[0].text
    stop = next(
        full[i : i + 2] for i in range(3, len(full)) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2]
    )
    in_prompt = next(w for w in prompt.split() if w not in full)
    for stops, text, finish in [([stop, "zzz"], full[: full.index(stop)], "stop"), ([in_prompt], full, "length")]:
        unary = api.completions.create(stop=stops, **values)
        assert (unary.choices[0].text, unary.choices[0].finish_reason) == (text, finish)
        chunks = list(api.completions.create(stop=stops, stream=True, **values))
        assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == finish
    wait_idle(server)
    before = server.metric("lora_generated_tokens_total", adapter="mlp-r64")
    cut = api.completions.create(stop=stop, **(values | {"max_tokens": 240}))
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 24
    wait_idle(server)
    assert server.metric("lora_generated_tokens_total", adapter="mlp-r64") - before < 200, "the generation ran on"


def test_32_concurrent_mixed_adapters_each_equal_to_alone(api, vocab):
    """32 requests over the base model and 4 adapters at once, token-id prompts of different lengths."""
    requests = mixed_requests(32, vocab, seed=5)

    def call(req, stream=False):
        name, ids = req
        values = dict(model=model_of(name), prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
        if stream:
            return "".join(c.choices[0].text for c in api.completions.create(stream=True, **values))
        return api.completions.create(**values).choices[0].text

    alone = [call(r) for r in requests]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(call, requests, [i % 2 == 0 for i in range(32)]))
    assert together == alone


def test_generation_controls_pass_through(api, peft_model, codec):
    ids = [1, 40, 41, 42, 40, 41]
    ref = peft_generate(peft_model, ids, "qv-r4", 10, EOS, repetition_penalty=1.5)
    extra = {"repetition_penalty": 1.5, "top_k": -1}
    out = api.completions.create(model="qv-r4", prompt=ids, max_tokens=10, temperature=0, extra_body=extra)
    assert out.choices[0].text == codec.decode(ref)
    out = api.completions.create(
        model="base", prompt=ids, max_tokens=9, extra_body={"ignore_eos": True, "min_tokens": 9}
    )
    assert out.usage.completion_tokens == 9 and out.choices[0].finish_reason == "length"
    a, b = (api.completions.create(model="qv-r4", prompt="hi", max_tokens=8, seed=11, top_p=0.9) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    assert api.completions.create(model="qv-r4", prompt="hi", max_tokens=2, user="tenant-7").usage.completion_tokens


def test_health_follows_the_engine(api, server, tmp_path):
    """200 while lora_llm is ready; a server whose tritonserver does not answer says 503, and so do its
    requests."""
    with urllib.request.urlopen(f"{str(api.base_url).removesuffix('/v1/')}/health", timeout=5) as r:
        assert r.status == 200
    dead = OpenAIServer("localhost:1", server.env["LORA_BASE_MODEL"], log_path=tmp_path / "openai.log")
    dead.start(wait_ready=False)
    try:
        assert dead.health() == 503
        client = openai.OpenAI(base_url=f"{dead.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="base", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        dead.stop()


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.heavy)], ids=["SIGINT", "SIGTERM"]
)
def test_one_command_serves_both_and_a_signal_stops_both(assets, tmp_path, sig):
    """`make serve` (python -m backend.serve): tritonserver and the OpenAI server on the ports given;
    SIGINT (Ctrl-C) or SIGTERM stops both, and the launcher exits 0."""
    ports = {name: free_port() for name in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "OPENAI_PORT")}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}}
    env |= {ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters")}
    with open(tmp_path / "serve.log", "w") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "backend.serve"], env=env, stdout=log, stderr=log)
    url = f"http://localhost:{ports['OPENAI_PORT']}"
    try:
        deadline = time.monotonic() + 180
        while http_status(f"{url}/health") != 200:
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="qv-r4", prompt="hi", max_tokens=3).usage.completion_tokens == 3
        children = psutil.Process(launcher.pid).children()
        assert len(children) == 2  # tritonserver and the OpenAI server
        launcher.send_signal(sig)
        assert launcher.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        terminate(launcher, 5, group=False)


def test_bad_requests_fail_alone_beside_good_ones(api, vocab):
    """An unknown model and bad values sent at once with 8 good requests: each bad one gets its own 404
    or 400, and the good ones get exactly their answers alone."""
    good = mixed_requests(8, vocab, seed=9)
    bad = [dict(model="no-such-adapter"), dict(model="qv-r4", temperature=-1), dict(model="qv-r4", max_tokens=10**5)]

    def call(req):
        name, ids = req
        return api.completions.create(model=model_of(name), prompt=ids, max_tokens=MAX_TOKENS, temperature=0)

    def refused(values):
        try:
            api.completions.create(**({"prompt": "hi", "max_tokens": 3} | values))
        except openai.APIStatusError as e:
            return e.status_code
        return None

    alone = [call(r).choices[0].text for r in good]
    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        errors = pool.map(refused, bad)
        together = [c.choices[0].text for c in pool.map(call, good)]
        assert list(errors) == [404, 400, 400]
    assert together == alone
