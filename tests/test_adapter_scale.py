"""1,000 adapters through the real tritonserver: mixed ranks (1-64) and targets on disk, max_loras 8, a
host tier that holds about 100 of them, and a Zipf workload over 300. Every request succeeds, a sample of
at least 50 equals PEFT token for token, and the adapter tiers stay within their budgets (printed)."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from client.api import generate
from client.perf_data import choose
from client.server import TritonServer
from demo.builders import build_adapter_farm
from tests.conftest import peft_generate

ADAPTERS, DISTINCT, HOLD, SLOTS = 1000, 300, 100, 8
EXTRA_REQUESTS, CLIENTS, NEW_TOKENS, CHECKED = 300, 16, 6, 60
MB = 2**20
EOS = 2  # the demo tokenizer's </s>: lora_llm's default end_id


def workload(names: list[str], rng: random.Random) -> list[tuple[str, list[int]]]:
    """Each of the DISTINCT adapters once, and EXTRA_REQUESTS more by Zipf popularity, shuffled."""
    touched = rng.sample(names, DISTINCT)
    picks = touched + choose(touched, "zipf", EXTRA_REQUESTS, rng)
    rng.shuffle(picks)
    return [(name, [1] + [rng.randrange(4, 512) for _ in range(rng.randrange(3, 12))]) for name in picks]


class Sampler:
    """Reads the tier gauges from the metrics endpoint while the workload runs; keeps the highest."""

    def __init__(self, server: TritonServer):
        self.server, self.peak = server, {"host": 0.0, "device": 0.0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.25):
            for tier in self.peak:
                self.peak[tier] = max(self.peak[tier], self.server.metric("lora_tier_bytes", tier=tier))

    def close(self):
        self.stop.set()
        self.thread.join()


def test_a_thousand_adapters_in_bounded_memory(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = build_adapter_farm(assets / "base", tmp_path / "farm", ADAPTERS, seed=1)
    sizes = {n: sum(f.stat().st_size for f in (tmp_path / "farm" / n).iterdir()) for n in names}
    budget = int(sum(sizes.values()) / len(sizes) * HOLD)
    rng = random.Random(7)
    jobs = workload(names, rng)
    env = {
        ENV_BASE_MODEL: str(assets / "base"),
        ENV_ADAPTER_DIR: str(tmp_path / "farm"),
        "LORA_MAX_LORAS": str(SLOTS),
        "LORA_HOST_LORA_MEMORY": str(budget),
    }
    with TritonServer(env=env, models=["lora_llm"]) as server:
        engine = server.processes()["lora_llm_0_0"]
        ready_rss = engine.memory_info().rss
        sampler = Sampler(server)
        start = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(
                pool.map(
                    lambda job: generate(
                        server.grpc_url, "lora_llm", input_ids=job[1], lora_name=job[0], max_tokens=NEW_TOKENS
                    ),
                    jobs,
                )
            )
        seconds = time.monotonic() - start
        sampler.close()
        after_rss = engine.memory_info().rss
        m = server.metric
        loads = m("lora_adapter_load_seconds_count", adapter=None)
        load_sum = m("lora_adapter_load_seconds_sum", adapter=None)
        buckets = {
            b: m("lora_adapter_load_seconds_bucket", le=b, adapter=None) for b in ("0.0025", "0.005", "0.01", "0.025")
        }
        stats = {
            "hits device": m("lora_cache_hits_total", tier="device"),
            "hits host": m("lora_cache_hits_total", tier="host"),
            "misses": m("lora_cache_misses_total"),
            "evictions device": m("lora_adapter_evictions_total", tier="device"),
            "evictions host": m("lora_adapter_evictions_total", tier="host"),
            "host adapters at the end": m("lora_tier_adapters", tier="host"),
            "failed reads": m("lora_adapter_load_failures_total"),
        }
        slot_bytes = m("lora_tier_budget_bytes", tier="device")
    print(
        f"\n{ADAPTERS} adapters on disk ({sum(sizes.values()) / MB:.1f} MB, ranks 1-64, "
        f"{min(sizes.values()) / 1024:.0f}-{max(sizes.values()) / 1024:.0f} KB each), {len(jobs)} requests over "
        f"{DISTINCT} of them (Zipf), {CLIENTS} clients, {seconds:.1f} s"
        f"\nhost tier: budget {budget / MB:.2f} MB (about {HOLD} adapters), peak {sampler.peak['host'] / MB:.2f} MB"
        f"\ndevice tier: {SLOTS} slots, buffers {slot_bytes / MB:.2f} MB, peak adapter bytes in them "
        f"{sampler.peak['device'] / MB:.2f} MB"
        f"\nlora_llm resident: {ready_rss / MB:.0f} MB at ready, {after_rss / MB:.0f} MB after "
        f"(+{(after_rss - ready_rss) / MB:.0f} MB)"
        f"\nreads from disk (read, check, hash): {loads:.0f}, mean {load_sum / max(loads, 1) * 1e3:.2f} ms; "
        + ", ".join(f"<= {b} s: {v:.0f}" for b, v in buckets.items())
        + "\n"
        + ", ".join(f"{k} {v:.0f}" for k, v in stats.items())
    )
    assert all(r.finish_reason in ("length", "stop") for r in results)
    assert sampler.peak["host"] <= budget and stats["failed reads"] == 0
    assert stats["evictions host"] > 0 and stats["misses"] >= DISTINCT
    assert after_rss - ready_rss < budget + 256 * MB  # the runtime: per-shape oneDNN kernels, activations

    base = AutoModelForCausalLM.from_pretrained(assets / "base", dtype=torch.float32)
    sample = list(dict.fromkeys(name for name, _ in jobs))[:CHECKED]
    model = PeftModel.from_pretrained(base, tmp_path / "farm" / sample[0], adapter_name=sample[0])
    for name in sample[1:]:
        model.load_adapter(tmp_path / "farm" / name, adapter_name=name)
    model.eval()
    checked = 0
    for (name, ids), result in zip(jobs, results):
        if name in sample:
            assert result.token_ids == peft_generate(model, ids, name, NEW_TOKENS, end_id=EOS), name
            checked += 1
    assert checked >= CHECKED
