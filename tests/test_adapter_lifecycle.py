"""Adapter lifecycle through the real tritonserver: tiers, pinning, updates and deletions of adapter
folders, admission when adapters outnumber slots. One server: max_loras 3, one of them pinned."""

import json
import os
import re
import shutil
import threading
import time

import pytest

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from client.api import InferenceServerException, generate, generate_in_order, stream
from client.server import TritonServer
from tests.conftest import NEVER, peft_generate
from tests.test_engine import prompts

COPIES = {
    "pinned": "qv-r4",
    "good": "all-r16-pattern",
    "a1": "mlp-r64",
    "a2": "qv-r4",
    "a3": "all-r16-pattern",
    "a4": "mlp-r64",
    "upd": "qv-r4",
    "del": "all-r16-pattern",
    "bad": "qv-r4",
}


@pytest.fixture(scope="module")
def adapter_dir(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle") / "adapters"
    for name, source in COPIES.items():
        shutil.copytree(assets / "adapters" / source, root / name)
    cfg = json.loads((root / "bad" / "adapter_config.json").read_text())
    (root / "bad" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 5}))  # its tensors have rank 4
    return root


@pytest.fixture(scope="module")
def lserver(assets, adapter_dir):
    env = {
        ENV_BASE_MODEL: str(assets / "base"),
        ENV_ADAPTER_DIR: str(adapter_dir),
        "LORA_MAX_LORAS": "3",
        "LORA_PINNED_LORAS": "pinned",
        "LORA_HOST_LORA_MEMORY": "64MiB",
    }
    with TritonServer(env=env, models=["lora_llm"]) as server:
        yield server


def ids(vocab_seed: int, n: int = 6) -> list[int]:
    return prompts(512, [n], seed=vocab_seed)[0]


def run(server, name: str, p: list[int], max_tokens: int = 4):
    return generate(server.grpc_url, "lora_llm", input_ids=p, lora_name=name or None, max_tokens=max_tokens)


class Background:
    """A streamed request (no end_id) read on its own thread, with the engine step of each response."""

    def __init__(self, server, name: str, p: list[int], max_tokens: int):
        self.tokens, self.steps, self.versions, self.error = [], [], set(), None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(server, name, p, max_tokens), daemon=True)
        self.thread.start()

    def _read(self, server, name, p, max_tokens):
        try:
            values = dict(input_ids=p, lora_name=name or None, max_tokens=max_tokens, end_id=NEVER, stream=True)
            for chunk in stream(server.grpc_url, "lora_llm", **values):
                self.tokens += chunk.token_ids
                self.steps += [chunk.engine_step] * len(chunk.token_ids)
                self.versions.add(chunk.adapter_version)
                self.first.set()
        except Exception as e:
            self.error = e
        finally:
            self.first.set()

    def join(self, timeout: float = 120.0) -> "Background":
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "a streamed request did not end"
        assert self.error is None, self.error
        return self


def test_tier_series_exist_from_the_start(lserver):
    text = lserver.metrics()
    for series in [
        'lora_tier_budget_bytes{model="lora_llm",tier="host"} 67108864',
        'lora_tier_adapters{model="lora_llm",tier="device"} 1',  # the pinned one
        'lora_adapter_loads_in_flight{model="lora_llm"} 0',
        'lora_adapter_load_seconds_count{model="lora_llm"} 1',
        'lora_cache_hits_total{adapter="pinned",model="lora_llm",tier="host"} 0',
        'lora_adapter_evictions_total{adapter="pinned",model="lora_llm",tier="device"} 0',
    ]:
        assert series in text, series


def routing_series(server) -> list[str]:
    return [line for line in server.metrics().splitlines() if line.startswith("vllm:")]


def lora_info(server, running: str, deadline_s: float = 10.0) -> tuple[dict[str, str], float]:
    """The labels and value of the one vllm:lora_requests_info series, once it lists `running` (it is
    published after the step, so it may trail the response by a moment)."""
    deadline = time.monotonic() + deadline_s
    while True:
        found = [line for line in routing_series(server) if line.startswith("vllm:lora_requests_info{")]
        assert len(found) == 1, found
        labels = dict(re.findall(r'(\w+)="([^"]*)"', found[0]))
        if labels["running_lora_adapters"] == running or time.monotonic() > deadline:
            return labels, float(found[0].rsplit(" ", 1)[1])
        time.sleep(0.05)


def test_the_routing_gauges_report_resident_adapters(lserver):
    """vLLM's names for routers (llm-d's lora-affinity scorer): an idle adapter in a slot is listed as
    running; one evicted from its slot leaves the list, and its old label set leaves /metrics."""
    text = "\n".join(routing_series(lserver))
    for series in [
        'vllm:num_requests_running{model="lora_llm"} 0',
        'vllm:num_requests_waiting{model="lora_llm"} 0',
        'vllm:kv_cache_usage_perc{model="lora_llm"} 0',
        'vllm:cache_config_info{block_size="16",model="lora_llm",num_gpu_blocks="',
    ]:
        assert series in text, series
    began = time.time()
    for name in ("a1", "a2"):  # with the pinned one, all three slots: a1 the least recently used
        run(lserver, name, ids(1), max_tokens=1)
    labels, stamp = lora_info(lserver, "a1,a2,pinned")
    assert labels == {
        "max_lora": "3",
        "model": "lora_llm",
        "running_lora_adapters": "a1,a2,pinned",
        "waiting_lora_adapters": "",
    }
    assert began - 1 < stamp < time.time() + 1  # the Unix time of the change (one clock: this machine's)
    run(lserver, "a3", ids(2), max_tokens=1)
    labels, _ = lora_info(lserver, "a2,a3,pinned")
    assert labels["running_lora_adapters"] == "a2,a3,pinned"
    assert "a1,a2,pinned" not in lserver.metrics()


def test_a_pinned_adapter_is_resident_from_the_start_and_never_evicted(lserver, peft_model):
    assert lserver.metric("lora_adapter_resident_bytes", adapter="pinned", tier="device") > 0
    assert lserver.metric("lora_adapter_resident_bytes", adapter="pinned", tier="host") > 0
    for i, name in enumerate(["a1", "a2", "a3", "a4", "a1", "a3"]):  # 4 adapters through 2 free slots
        p = ids(i)
        assert run(lserver, name, p).token_ids == peft_generate(peft_model, p, COPIES[name], 4)
    assert lserver.metric("lora_adapter_evictions_total", adapter="a1", tier="device") >= 1
    hits = lserver.metric("lora_cache_hits_total", adapter="pinned", tier="device")
    p = ids(9)
    assert run(lserver, "pinned", p).token_ids == peft_generate(peft_model, p, "qv-r4", 4)
    assert lserver.metric("lora_cache_hits_total", adapter="pinned", tier="device") == hits + 1
    assert lserver.metric("lora_cache_misses_total", adapter="pinned") == 0
    assert lserver.metric("lora_adapter_evictions_total", adapter="pinned") == 0


def test_a_bad_adapter_does_not_evict_a_good_one(lserver, peft_model):
    for name in ("good", "a2"):  # both free slots now hold good adapters, idle
        run(lserver, name, ids(1))
    evicted = lserver.metric("lora_adapter_evictions_total", tier="device")
    hits = lserver.metric("lora_cache_hits_total", adapter="good", tier="device")
    beside = Background(lserver, "", ids(8), 240)  # a base stream runs through it (it holds no slot)
    assert beside.first.wait(60)
    with pytest.raises(InferenceServerException, match="LoRA adapter 'bad'.*rank 5.*rank 4"):
        run(lserver, "bad", ids(2))
    assert beside.join().tokens == peft_generate(peft_model, ids(8), "", 240, NEVER)
    assert lserver.metric("lora_adapter_evictions_total", tier="device") == evicted
    assert lserver.metric("lora_adapter_load_failures_total", adapter="bad") == 1
    p = ids(3)
    assert run(lserver, "good", p).token_ids == peft_generate(peft_model, p, "all-r16-pattern", 4)
    assert lserver.metric("lora_cache_hits_total", adapter="good", tier="device") == hits + 1


def replace_files(src, dst) -> None:
    """Replaces an adapter's two files the way docs/adapters.md says: each written beside it, then renamed."""
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copyfile(src / f, dst / f"{f}.new")
        os.replace(dst / f"{f}.new", dst / f)


def test_a_running_request_keeps_its_version_while_new_ones_get_the_update(lserver, assets, adapter_dir, peft_model):
    p_old, p_new = ids(4), ids(5)
    before = run(lserver, "upd", p_new)
    running = Background(lserver, "upd", p_old, 240)
    assert running.first.wait(60) and running.thread.is_alive()
    replace_files(assets / "adapters" / "mlp-r64", adapter_dir / "upd")
    assert running.thread.is_alive(), "the long request ended before the update: the test proves nothing"
    after = run(lserver, "upd", p_new)  # it sees the new files as it arrives, while the long one runs
    running.join()
    assert before.token_ids == peft_generate(peft_model, p_new, "qv-r4", 4)
    assert after.token_ids == peft_generate(peft_model, p_new, "mlp-r64", 4)
    assert running.tokens == peft_generate(peft_model, p_old, "qv-r4", 240, NEVER)
    assert running.versions == {before.adapter_version} and after.adapter_version != before.adapter_version
    assert len(after.adapter_version) == 16
    assert lserver.metric("lora_adapter_updates_total", adapter="upd") == 1


def test_a_deleted_folder_gives_not_found_and_running_requests_finish(lserver, adapter_dir, peft_model):
    p = ids(6)
    running = Background(lserver, "del", p, 240)
    assert running.first.wait(60) and running.thread.is_alive()
    shutil.rmtree(adapter_dir / "del")
    assert running.thread.is_alive(), "the long request ended before the deletion: the test proves nothing"
    with pytest.raises(InferenceServerException, match="LoRA adapter 'del' not found"):
        run(lserver, "del", ids(7))
    running.join()
    assert running.tokens == peft_generate(peft_model, p, "all-r16-pattern", 240, NEVER)


def test_a_base_request_never_waits_for_a_slot(lserver, peft_model):
    """Both free slots held by long streams; then, in this order on one gRPC stream, a request for a third
    adapter and a base request. The base request is answered while both holders still run; the adapter
    request's token comes only after one of them has ended. The order is the engine's own: each response
    carries the engine step that made it (never the client's receive times, which cross streams)."""
    holders = [Background(lserver, name, ids(10 + i), 240) for i, name in enumerate(["a1", "a3"])]
    for h in holders:
        assert h.first.wait(60)
    p_wait, p_base = ids(12), ids(13)
    asked = [dict(input_ids=p_wait, lora_name="a4", max_tokens=1), dict(input_ids=p_base, max_tokens=4)]
    waiter, base = generate_in_order(lserver.grpc_url, "lora_llm", [{**v, "end_id": NEVER} for v in asked])
    for h in holders:
        h.join()
    freed = min(h.steps[-1] for h in holders)  # the step of the first holder's last token: its slot frees after it
    assert base.token_ids == peft_generate(peft_model, p_base, "", 4)
    assert waiter.token_ids == peft_generate(peft_model, p_wait, "mlp-r64", 1)
    assert base.engine_step < freed, "the holders ended before the base request was answered: the test proves nothing"
    assert waiter.engine_step > freed, "the adapter request ran while both slots were held"


def test_no_adapter_starves_behind_requests_for_resident_ones(lserver, peft_model):
    """Worst case for grouping: overlapping requests keep both free slots busy without pause. A request
    for a third adapter still gets a slot while that traffic goes on: engine steps answer traffic after it
    (server-side order; the traffic itself runs for 8 s of wall time)."""
    stop = time.monotonic() + 8
    served = {"a1": 0, "a2": 0}
    traffic_steps: list[int] = []

    def traffic(name, seed):
        i = 0
        while time.monotonic() < stop:
            traffic_steps.append(run(lserver, name, ids(seed + i), 60).engine_step)
            served[name] += 1
            i += 1

    threads = [
        threading.Thread(target=traffic, args=(n, 100 * k + j)) for k, n in enumerate(served) for j in (0, 30, 60, 90)
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)
    p = ids(20)
    start = time.monotonic()
    x = run(lserver, "good", p)
    waited = time.monotonic() - start
    during = dict(served)
    for t in threads:
        t.join()
    print(
        f"\nstarvation test: the third adapter waited {waited:.2f} s; traffic served {during} before, {served} in all"
    )
    assert x.token_ids == peft_generate(peft_model, p, "all-r16-pattern", 4)
    assert max(traffic_steps) > x.engine_step, "the request waited for the traffic to end"
    assert all(served[n] > during[n] for n in served), "the other traffic stopped"
