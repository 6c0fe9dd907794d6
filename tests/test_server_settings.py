"""Settings and set-up through the real tritonserver: LORA_<NAME> overrides shown by the config endpoint
and the log, chunked prefill seen by a client (a short request behind a long prompt), and a base model
folder without a tokenizer (lora_llm serves ids, the text models refuse to load)."""

import json
import queue
import shutil

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from client.api import generate, make_inputs
from client.server import TritonServer
from tests.conftest import peft_generate
from tests.test_engine import prompts

CHUNK = 4


@pytest.fixture(scope="module")
def chunked(assets):
    """lora_llm with prompts fed 4 tokens per step and a 240-token context, set by environment variables."""
    env = {
        ENV_BASE_MODEL: str(assets / "base"),
        ENV_ADAPTER_DIR: str(assets / "adapters"),
        "LORA_MAX_PREFILL_TOKENS": str(CHUNK),
        "LORA_MAX_MODEL_LEN": "240",
        "LORA_KV_CACHE_MEMORY": "2MiB",
    }
    with TritonServer(env=env, models=["lora_llm"]) as server:
        yield server


def test_the_log_shows_the_settings_in_effect(chunked, assets):
    log = chunked.log_path.read_text()
    assert f"lora_llm settings: base_model={assets / 'base'} adapter_dir={assets / 'adapters'} " in log
    assert " max_model_len=240 max_prefill_tokens=4 kv_cache_memory=2MiB kv_block_size=16 " in log
    assert "KV cache 2.0 MiB: 256 blocks of 16 tokens, 4096 tokens at 512 bytes each" in log


@pytest.mark.heavy
def test_a_config_given_at_load_is_served_and_shown(assets, tmp_path):
    """Triton's own override: the load API with a whole config (explicit model control). The config
    endpoint then shows it, and the engine runs with it."""
    env = {ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters")}
    with TritonServer(env=env, models=["lora_llm"]) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        config = client.get_model_config("lora_llm")
        config["parameters"]["max_model_len"] = {"string_value": "96"}
        config["parameters"]["kv_block_size"] = {"string_value": "32"}
        client.load_model("lora_llm", config=json.dumps(config))
        params = client.get_model_config("lora_llm")["parameters"]
        assert params["max_model_len"]["string_value"] == "96" and params["kv_block_size"]["string_value"] == "32"
        assert "max_model_len 96" in server.log_path.read_text().split("lora_llm settings:")[-1]
        with pytest.raises(InferenceServerException, match="exceeds the context of 96 tokens"):
            generate(server.grpc_url, "lora_llm", input_ids=[1] * 90, max_tokens=10)


def test_a_short_request_behind_a_long_prompt_comes_first(chunked, peft_model):
    """A 200-token prompt (50 chunks of 4) and, sent just after it on the same gRPC stream, a 5-token
    one: the short request has all its 3 tokens before the long one has its first; the long prompt
    took at least 50 steps."""
    vocab = peft_model.get_input_embeddings().num_embeddings
    long_p, short_p = prompts(vocab, [200, 5], seed=51)
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(chunked.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    steps_before = chunked.metric("lora_engine_steps_total")
    for rid, ids, adapter, n in [("long", long_p, "qv-r4", 4), ("short", short_p, "mlp-r64", 3)]:
        values = dict(input_ids=ids, lora_name=adapter, max_tokens=n, stream=True)
        client.async_stream_infer("lora_llm", make_inputs(grpcclient, **values), request_id=rid)
    seen: list[tuple[str, int]] = []
    while len(seen) < 7:
        result, error = events.get(timeout=60)
        assert error is None, error
        rid = result.get_response().id
        seen += [(rid, t) for t in result.as_numpy("output_ids").reshape(-1).tolist()]
    client.stop_stream()
    client.close()
    names = [n for n, _ in seen]
    assert names == ["short"] * 3 + ["long"] * 4, names
    assert [t for n, t in seen if n == "short"] == peft_generate(peft_model, short_p, "mlp-r64", 3)
    assert [t for n, t in seen if n == "long"] == peft_generate(peft_model, long_p, "qv-r4", 4)
    steps = chunked.metric("lora_engine_steps_total") - steps_before
    assert 200 // CHUNK + 3 <= steps <= 200 // CHUNK + 1 + 3 + 3, steps  # chunks, decodes; the short ones overlap


@pytest.mark.heavy
def test_a_base_folder_without_a_tokenizer(assets, tmp_path, peft_model):
    base = tmp_path / "base"
    shutil.copytree(assets / "base", base)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    env = {ENV_BASE_MODEL: str(base), ENV_ADAPTER_DIR: str(assets / "adapters")}
    with TritonServer(env=env, models=["lora_llm"]) as server:
        ids = [1, 17, 99, 4]
        out = generate(server.grpc_url, "lora_llm", input_ids=ids, lora_name="qv-r4", max_tokens=3, end_id=-1)
        assert out.token_ids == peft_generate(peft_model, ids, "qv-r4", 3)
        with pytest.raises(InferenceServerException, match="stream_whole_chars needs a tokenizer"):
            generate(server.grpc_url, "lora_llm", input_ids=ids, stream=True, stream_whole_chars=True)
        client = httpclient.InferenceServerClient(server.http_url)
        for model in ["lora_text", "ensemble"]:
            with pytest.raises(InferenceServerException) as e:
                client.load_model(model)
            assert f"base model folder {base} has no tokenizer (tokenizer.json or tokenizer.model)" in str(e.value)
