"""Memory: the base weights are resident once whatever front door serves them, each extra adapter
costs about its own tensor bytes, and a long-context model stays within its KV-cache budget."""

import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import tritonclient.http as httpclient

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL, EngineConfig
from backend.engine.engine import Engine
from client.api import generate
from client.server import TritonServer
from demo.builders import build_adapter, build_model

MB = 2**20


def tree_rss(server: TritonServer) -> int:
    """Resident bytes of the server and all its Python stubs."""
    return sum(p.memory_info().rss for p in server.processes().values())


@pytest.fixture(scope="module")
def big_base(tmp_path_factory):
    """A ~300 MB fp32 Llama: a second copy would stand far above the noise of a stub process."""
    root = tmp_path_factory.mktemp("big")
    build_model(
        root / "base",
        vocab_size=512,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
    )
    (root / "adapters").mkdir()
    return root


@pytest.mark.heavy
def test_front_doors_do_not_copy_the_base(big_base, capsys):
    weights = (big_base / "base" / "model.safetensors").stat().st_size
    env = {ENV_BASE_MODEL: str(big_base / "base"), ENV_ADAPTER_DIR: str(big_base / "adapters")}
    with TritonServer(env=env, models=["lora_llm"]) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        rss = {"lora_llm": tree_rss(server)}
        for model in ["lora_text", "ensemble"]:  # front doors: tokenizer only
            client.load_model(model)
            rss[model] = tree_rss(server)
    with capsys.disabled():
        print(f"\nbase weights {weights / MB:.0f} MB; server + stubs resident:", end=" ")
        print(", ".join(f"+{m} {v / MB:.0f} MB" for m, v in rss.items()))
    assert rss["lora_llm"] > weights  # the weights are in there once
    assert rss["lora_text"] - rss["lora_llm"] < weights / 2
    assert rss["ensemble"] - rss["lora_text"] < weights / 2


def test_memory_per_adapter_is_its_tensor_bytes(tmp_path, capsys):
    """RSS growth per adapter loaded into the engine, against the adapter's tensor bytes."""
    build_model(
        tmp_path / "base",
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    ranks = [8, 16, 32, 64, 64, 64]
    for i, r in enumerate(ranks):
        build_adapter(
            tmp_path / "base", tmp_path / "adapters" / f"a{i}", seed=i, r=r, lora_alpha=r, target_modules="all-linear"
        )
    engine = Engine(
        EngineConfig(
            base_model=tmp_path / "base", adapter_dir=tmp_path / "adapters", max_loras=len(ranks), max_lora_rank=64
        )
    )
    me = psutil.Process()
    rows = []
    for i in range(len(ranks)):
        before = me.memory_info().rss
        adapter = engine.adapters.load_now(f"a{i}")
        engine.adapters.begin_round([])
        engine.adapters.release(engine.adapters.acquire(engine.adapters.want(f"a{i}"))[0])
        rows.append((f"a{i}", ranks[i], adapter.nbytes, me.memory_info().rss - before))
    slots = sum({id(layer.w): layer.w.nbytes for layer in engine.runner.lora.layers.values()}.values())
    with capsys.disabled():
        print(f"\nslot buffers (fixed, {len(ranks)} slots x rank 64): {slots / MB:.1f} MB")
        print("adapter  rank  tensor MB  RSS growth MB")
        for name, r, nbytes, grown in rows:
            print(f"{name:>7} {r:>5} {nbytes / MB:>10.2f} {grown / MB:>14.2f}")
    for name, _, nbytes, grown in rows:
        assert grown < 1.25 * nbytes + 1 * MB, name


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """A tiny Llama (hidden 64, 2 layers) with a 131,072-token context: 1 KiB of K/V per token."""
    root = tmp_path_factory.mktemp("long")
    build_model(
        root / "base",
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=131072,
    )
    build_adapter(root / "base", root / "adapters" / "a", r=8, lora_alpha=16, target_modules="all-linear")
    return root


def runtime_rss() -> int:
    """Resident bytes of a Python process that has imported what the engine's stub imports."""
    code = "import psutil, torch, transformers, peft, backend.engine.engine; print(psutil.Process().memory_info().rss)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_a_long_context_model_stays_within_its_kv_budget(long_context, capsys):
    """32 concurrent requests on a 131,072-token model: the engine's process holds the runtime, the
    weights and the KV budget, and no more (before the paged cache it grew to 2.56 GB)."""
    budget = 256 * MB  # two full-length sequences
    env = {
        ENV_BASE_MODEL: str(long_context / "base"),
        ENV_ADAPTER_DIR: str(long_context / "adapters"),
        "LORA_KV_CACHE_MEMORY": "256MiB",
        # freed activations go back to the system, so the resident size is what the process holds
        # (glibc's adaptive threshold otherwise keeps 10-100 MB of them, a different amount each run)
        "MALLOC_MMAP_THRESHOLD_": str(1 * MB),
    }
    weights = (long_context / "base" / "model.safetensors").stat().st_size
    with TritonServer(env=env, models=["lora_llm"]) as server:
        stub = server.processes()["lora_llm_0_0"]
        ready = stub.memory_info().rss
        rng = random.Random(0)
        reqs = [[1] + [rng.randrange(4, 512) for _ in range(rng.randrange(50, 2000))] for _ in range(32)]
        with ThreadPoolExecutor(32) as pool:
            outs = list(
                pool.map(
                    lambda i: generate(
                        server.grpc_url, "lora_llm", input_ids=reqs[i], lora_name="a" if i % 2 else None, max_tokens=16
                    ),
                    range(32),
                )
            )
        after = stub.memory_info().rss
    runtime = runtime_rss()
    with capsys.disabled():
        print(
            f"\n131,072-token context: runtime {runtime / MB:.0f} MB, weights {weights / MB:.1f} MB, "
            f"KV budget {budget / MB:.0f} MB; lora_llm resident at ready {ready / MB:.0f} MB, "
            f"after 32 concurrent requests {after / MB:.0f} MB"
        )
    assert all(len(o.token_ids) == 16 for o in outs)
    # past the KV budget: activations of 2048-token steps, and oneDNN's cache of kernels per shape
    assert after <= runtime + weights + budget + 160 * MB
    assert after - ready < 160 * MB


def test_a_budget_short_of_one_full_length_sequence_fails_the_load(long_context):
    env = {
        ENV_BASE_MODEL: str(long_context / "base"),
        ENV_ADAPTER_DIR: str(long_context / "adapters"),
        "LORA_KV_CACHE_MEMORY": "64MiB",
    }
    with pytest.raises(RuntimeError) as e:
        TritonServer(env=env, models=["lora_llm"]).start(timeout=120)
    assert (
        "the KV cache budget 64.0 MiB (67108864 bytes) holds 65536 tokens at 1024 bytes per token; "
        "one sequence of max_model_len 131072 needs 128.0 MiB. Raise kv_cache_memory or lower max_model_len."
    ) in str(e.value)
