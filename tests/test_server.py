"""The real tritonserver on model_repository/, driven through tritonclient, checked against PEFT."""

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from tritonclient.utils import InferenceServerException

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from client.api import generate, infer, stream
from client.server import TritonServer, copy_repository
from tests.conftest import ADAPTERS, peft_generate

MAX_TOKENS = 10


def mixed_requests(n: int, vocab: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """n (adapter, prompt ids) pairs cycling over the base model and every adapter, prompt lengths 1..40."""
    rng = random.Random(seed)
    names = ["", *ADAPTERS]
    return [
        (names[i % len(names)], [1] + [rng.randrange(4, vocab) for _ in range(rng.randrange(0, 40))]) for i in range(n)
    ]


def status(e: InferenceServerException) -> str:
    return str(e.status())


def test_concurrent_mixed_adapters_match_peft(server, peft_model):
    """>= 16 concurrent requests over 4 adapters + base, prompts of different lengths: each greedy
    output equals PEFT's generate(..., adapter_names=[...]), token for token (fp32)."""
    vocab = peft_model.get_input_embeddings().num_embeddings
    requests = mixed_requests(20, vocab)
    mixed_before = server.metric("lora_engine_mixed_steps_total")

    def call(req):
        name, ids = req
        return generate(
            server.grpc_url, "lora_llm", input_ids=ids, lora_name=name or None, max_tokens=MAX_TOKENS, end_id=-1
        )

    with ThreadPoolExecutor(len(requests)) as pool:
        outputs = list(pool.map(call, requests))
    for (name, ids), out in zip(requests, outputs):
        assert out.token_ids == peft_generate(peft_model, ids, name, MAX_TOKENS), (name, ids)
        assert out.finish_reason == "length" and len(out.log_probs) == MAX_TOKENS
    # requests for different adapters ran in the same engine steps
    assert server.metric("lora_engine_mixed_steps_total") > mixed_before
    assert server.metric("lora_engine_max_adapters_per_step") >= 3
    for name in ["__base__", *ADAPTERS]:
        assert server.metric("lora_requests_total", adapter=name) >= 4, name
        assert server.metric("lora_generated_tokens_total", adapter=name) >= 4 * MAX_TOKENS, name


def test_ensemble_stream_equals_unary(server):
    """gRPC streaming on the ensemble: the text arrives over many responses; joined, they equal the
    unary answer of lora_text over HTTP and over gRPC. A response holds one token, or a few where a
    character spans tokens or where sends fell behind the engine (so the count depends on timing)."""
    prompt = "Beautiful is better than"
    for name in [None, "qv-r4", "all-r16-pattern"]:
        values = dict(text_input=prompt, lora_name=name, max_tokens=MAX_TOKENS, end_id=-1)
        chunks = list(stream(server.grpc_url, "ensemble", stream=True, **values))
        unary_http = infer(server.http_url, "http", "lora_text", **values)
        unary_grpc = infer(server.grpc_url, "grpc", "lora_text", **values)
        assert 1 < len(chunks) <= MAX_TOKENS
        assert all(c.text for c in chunks[:-1])
        assert "".join(c.text for c in chunks) == unary_http.text == unary_grpc.text
        assert [c.finish_reason for c in chunks] == [""] * (len(chunks) - 1) + ["length"]
        with_prompt = infer(server.http_url, "http", "lora_text", exclude_input_in_output=False, **values)
        assert with_prompt.text == prompt + unary_http.text
        # every response names the adapter version that served it (none for the base model)
        version = generate(server.grpc_url, "lora_llm", input_ids=[1, 5], lora_name=name, max_tokens=1).adapter_version
        assert len(version) == (16 if name else 0)
        assert (
            {c.adapter_version for c in chunks} == {unary_http.adapter_version, unary_grpc.adapter_version} == {version}
        )


def test_token_stream_equals_unary(server):
    values = dict(input_ids=[1, 30, 31, 32], lora_name="mlp-r64", max_tokens=MAX_TOKENS, end_id=-1)
    chunks = list(stream(server.grpc_url, "lora_llm", stream=True, **values))
    unary = generate(server.grpc_url, "lora_llm", **values)
    assert len(chunks) > 1 and all(c.token_ids for c in chunks)
    assert sum((c.token_ids for c in chunks), []) == unary.token_ids
    assert sum((c.log_probs for c in chunks), []) == pytest.approx(unary.log_probs)


def test_unknown_adapter_fails_alone(server, peft_model):
    """In one concurrent batch, the request for an unknown adapter gets NOT_FOUND and the others succeed."""
    vocab = peft_model.get_input_embeddings().num_embeddings
    requests = mixed_requests(10, vocab, seed=1)
    requests.insert(3, ("no-such-adapter", [1, 5, 6]))

    def call(req):
        name, ids = req
        try:
            return generate(server.grpc_url, "lora_llm", input_ids=ids, lora_name=name or None, max_tokens=4, end_id=-1)
        except InferenceServerException as e:
            return e

    with ThreadPoolExecutor(len(requests)) as pool:
        outputs = list(pool.map(call, requests))
    err = outputs.pop(3)
    requests.pop(3)
    assert isinstance(err, InferenceServerException)
    assert err.message() == "LoRA adapter 'no-such-adapter' not found"  # a gRPC stream carries no status code
    for (name, ids), out in zip(requests, outputs):
        assert not isinstance(out, Exception), out
        assert out.token_ids == peft_generate(peft_model, ids, name, 4)
    # the unary text model answers with the status code: 404 over HTTP, NOT_FOUND over gRPC
    for protocol, code in [("http", "404"), ("grpc", "StatusCode.NOT_FOUND")]:
        url = server.http_url if protocol == "http" else server.grpc_url
        with pytest.raises(InferenceServerException) as info:
            infer(url, protocol, "lora_text", text_input="hi", lora_name="nope")
        assert status(info.value) == code and info.value.message() == "LoRA adapter 'nope' not found"


BAD_TEXT_INPUTS = {  # through lora_text, which answers with a status code
    "path name": dict(lora_name="../x"),
    "slash name": dict(lora_name="a/b"),
    "max_tokens 0": dict(max_tokens=0),
    "max_tokens above limit": dict(max_tokens=100_000),
    "prompt longer than context": dict(text_input="Beautiful is better than ugly. " * 100),
    "negative temperature": dict(temperature=-1.0),
    "top_p 0": dict(top_p=0.0),
}
BAD_TOKEN_INPUTS = {  # straight to lora_llm: a gRPC stream carries the message, not the code
    "empty ids": (dict(input_ids=[]), "input_ids is empty"),
    "id above vocab": (dict(input_ids=[1, 10**6]), "outside the vocabulary"),
    "negative id": (dict(input_ids=[1, -3]), "outside the vocabulary"),
    "prompt longer than context": (dict(input_ids=[5] * 300), "does not fit the context"),
}


def assert_still_serving(server):
    out = generate(server.grpc_url, "lora_llm", input_ids=[1, 5, 6], lora_name="qv-r4", max_tokens=2)
    assert len(out.token_ids) == 2


@pytest.mark.parametrize("case", BAD_TEXT_INPUTS)
def test_bad_text_input_is_invalid_arg(server, case):
    values = {"text_input": "Beautiful is", **BAD_TEXT_INPUTS[case]}
    for protocol, code in [("http", "400"), ("grpc", "StatusCode.INVALID_ARGUMENT")]:
        url = server.http_url if protocol == "http" else server.grpc_url
        with pytest.raises(InferenceServerException) as info:
            infer(url, protocol, "lora_text", **values)
        assert status(info.value) == code, info.value
    assert_still_serving(server)


@pytest.mark.parametrize("case", BAD_TOKEN_INPUTS)
def test_bad_token_input_is_refused(server, case):
    values, message = BAD_TOKEN_INPUTS[case]
    with pytest.raises(InferenceServerException, match=message):
        generate(server.grpc_url, "lora_llm", **values)
    assert_still_serving(server)


def test_empty_name_is_base_model(server, peft_model):
    ids = [1, 7, 8, 9]
    out = generate(server.grpc_url, "lora_llm", input_ids=ids, lora_name="", max_tokens=5, end_id=-1)
    assert out.token_ids == peft_generate(peft_model, ids, "", 5)


def test_seeded_sampling_is_repeatable(server):
    values = dict(input_ids=[1, 9, 10, 11], lora_name="qv-r4", max_tokens=8, temperature=1.0, top_p=0.9, top_k=50)
    a = generate(server.grpc_url, "lora_llm", seed=7, **values).token_ids
    b = generate(server.grpc_url, "lora_llm", seed=7, **values).token_ids
    c = generate(server.grpc_url, "lora_llm", seed=8, **values).token_ids
    assert a == b and len(a) == 8
    assert a != c


def test_new_adapter_folder_served_without_restart(server, assets, peft_model):
    """An adapter copied into the adapter folder after start is served on its first request."""
    import shutil

    shutil.copytree(assets / "adapters" / "qv-r4", assets / "adapters" / "late-copy")
    ids = [1, 20, 21, 22]
    out = generate(server.grpc_url, "lora_llm", input_ids=ids, lora_name="late-copy", max_tokens=5, end_id=-1)
    assert out.token_ids == peft_generate(peft_model, ids, "qv-r4", 5)


def test_triton_kernels_in_the_server_match_peft(assets, peft_model, tmp_path):
    """lora_backend=triton: the Triton kernels (here under the interpreter) serve a mixed batch through
    the real tritonserver, and each greedy output equals PEFT's."""
    repo = copy_repository(tmp_path / "repo", lora_backend="triton")
    env = {ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters")}
    vocab = peft_model.get_input_embeddings().num_embeddings
    requests = mixed_requests(10, vocab, seed=2)
    with TritonServer(repository=repo, env=env, models=["lora_llm"]) as server:
        with ThreadPoolExecutor(len(requests)) as pool:
            outputs = list(
                pool.map(
                    lambda r: generate(
                        server.grpc_url, "lora_llm", input_ids=r[1], lora_name=r[0] or None, max_tokens=4, end_id=-1
                    ),
                    requests,
                )
            )
        assert server.metric("lora_engine_mixed_steps_total") > 0
    for (name, ids), out in zip(requests, outputs):
        assert out.token_ids == peft_generate(peft_model, ids, name, 4), (name, ids)


def wait_idle(server, timeout: float = 10.0) -> None:
    """Until the engine runs nothing and has published its counters (it does when idle)."""
    deadline = time.monotonic() + timeout
    while server.metric("lora_engine_running_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)


def test_stop_words_in_the_text_doors(server):
    """stop_words on lora_text and the ensemble stream: the text ends before the first stop string the
    generation produced (one that only the prompt holds does not count), finish_reason is "stop", and
    the generation stops there instead of running on to max_tokens."""
    prompt = "Beautiful is better than"
    values = dict(text_input=prompt, lora_name="qv-r4", max_tokens=24, end_id=-1)
    full = infer(server.http_url, "http", "lora_text", **values).text
    stop = next(full[i : i + 3] for i in range(4, len(full)) if full[i : i + 3].strip() and full[i : i + 3] != "\ufffd")
    expected = full[: full.index(stop)]
    in_prompt = next(w for w in prompt.split() if w not in full)
    for stops, text, finish in [([stop], expected, "stop"), (["zzz", in_prompt], full, "length")]:
        unary = infer(server.grpc_url, "grpc", "lora_text", stop_words=stops, **values)
        chunks = list(stream(server.grpc_url, "ensemble", stream=True, stop_words=stops, **values))
        assert (unary.text, unary.finish_reason) == (text, finish)
        assert "".join(c.text for c in chunks) == text and chunks[-1].finish_reason == finish
    echoed = infer(server.http_url, "http", "lora_text", stop_words=[stop], exclude_input_in_output=False, **values)
    assert echoed.text.endswith(expected) and len(echoed.text) > len(expected)
    wait_idle(server)
    before = server.metric("lora_generated_tokens_total", adapter="qv-r4")
    long = infer(server.http_url, "http", "lora_text", stop_words=[stop], **(values | {"max_tokens": 240}))
    assert long.text == expected
    wait_idle(server)
    ran = server.metric("lora_generated_tokens_total", adapter="qv-r4") - before
    print(f"\nstop string found after {len(expected)} chars; the engine generated {ran:.0f} of 240 tokens")
    assert ran < 200, "the generation ran on"
    with pytest.raises(InferenceServerException, match="at most 4 stop strings"):
        infer(server.http_url, "http", "lora_text", stop_words=["a", "b", "c", "d", "e"], **values)


def test_generation_controls_reach_the_engine(server, peft_model):
    ids = [1, 40, 41, 42, 40, 41]
    values = dict(input_ids=ids, lora_name="qv-r4", max_tokens=12, end_id=-1)
    out = generate(server.grpc_url, "lora_llm", repetition_penalty=1.5, **values)
    assert out.token_ids == peft_generate(peft_model, ids, "qv-r4", 12, repetition_penalty=1.5)
    long = generate(server.grpc_url, "lora_llm", input_ids=ids, max_tokens=20, ignore_eos=True, min_length=20)
    assert len(long.token_ids) == 20 and long.finish_reason == "length"
    text = infer(server.http_url, "http", "lora_text", text_input="Beautiful is", presence_penalty=2.0, max_tokens=4)
    assert text.text
