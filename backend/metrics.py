"""Engine and per-adapter counters. `Metrics` keeps them in memory; `TritonMetrics` also publishes
them through Triton's metrics endpoint (pb_utils custom metrics) on `flush`: each publication is a
round trip to the server process, too slow to make for every token."""

import threading
from collections import defaultdict

BASE = "__base__"  # label of requests without an adapter (not a valid adapter name)

COUNTERS = {
    "lora_requests_total": "Requests received, per adapter",
    "lora_generated_tokens_total": "Tokens generated, per adapter",
    "lora_cache_hits_total": "Requests whose adapter was already in a device slot",
    "lora_cache_misses_total": "Requests whose adapter had to be put into a device slot",
    "lora_adapter_loads_total": "Adapter reads from disk",
    "lora_adapter_load_seconds_total": "Seconds spent reading adapters from disk",
    "lora_adapter_evictions_total": "Adapters evicted from a device slot",
    "lora_engine_steps_total": "Engine steps (one forward over the running batch)",
    "lora_engine_mixed_steps_total": "Engine steps whose batch held more than one adapter (the base counts as one)",
    "lora_engine_preemptions_total": "Running sequences preempted (fed again later) because the KV cache was full",
}
GAUGES = {
    "lora_engine_max_adapters_per_step": "Most distinct adapters (the base counts as one) seen in one engine step",
    "lora_engine_running_sequences": "Sequences in the running batch",
    "lora_engine_waiting_requests": "Requests queued for a running place, KV-cache blocks or an adapter slot",
    "lora_kv_cache_blocks_in_use": "KV-cache blocks held by running sequences",
    "lora_adapter_slots_in_use": "Adapter slots held by running sequences",
}


class Metrics:
    def __init__(self):
        self.values: dict[tuple[str, str], float] = defaultdict(float)

    def inc(self, name: str, adapter: str = "", value: float = 1.0) -> None:
        self.values[name, adapter] += value

    def set_max(self, name: str, value: float) -> None:
        self.values[name, ""] = max(self.values[name, ""], value)

    def gauge(self, name: str, value: float) -> None:
        self.values[name, ""] = value

    def get(self, name: str, adapter: str = "") -> float:
        return self.values.get((name, adapter), 0.0)

    def flush(self) -> None:
        """Publishes what changed since the last flush (here: nothing to publish)."""

    def request(self, adapter: str) -> None:
        self.inc("lora_requests_total", adapter or BASE)

    def tokens(self, adapter: str, n: int) -> None:
        self.inc("lora_generated_tokens_total", adapter or BASE, n)

    def step(self, adapters: set[str]) -> None:
        self.inc("lora_engine_steps_total")
        if len(adapters) > 1:
            self.inc("lora_engine_mixed_steps_total")
        self.set_max("lora_engine_max_adapters_per_step", len(adapters))

    def occupancy(self, running: int, slots: int, waiting: int, kv_blocks: int) -> None:
        self.gauge("lora_engine_running_sequences", running)
        self.gauge("lora_kv_cache_blocks_in_use", kv_blocks)
        self.gauge("lora_adapter_slots_in_use", slots)
        self.gauge("lora_engine_waiting_requests", waiting)

    def adapter_cache(self, adapter: str, hit: bool) -> None:
        self.inc("lora_cache_hits_total" if hit else "lora_cache_misses_total", adapter)

    def adapter_loaded(self, adapter: str, seconds: float) -> None:
        self.inc("lora_adapter_loads_total", adapter)
        self.inc("lora_adapter_load_seconds_total", adapter, seconds)

    def adapter_evicted(self, adapter: str) -> None:
        self.inc("lora_adapter_evictions_total", adapter)


class TritonMetrics(Metrics):
    """Publishes every value as a Triton custom metric labelled with the model and the adapter."""

    def __init__(self, pb_utils, model: str):
        super().__init__()
        kinds = [(COUNTERS, pb_utils.MetricFamily.COUNTER), (GAUGES, pb_utils.MetricFamily.GAUGE)]
        self.families = {
            name: pb_utils.MetricFamily(name=name, description=desc, kind=kind)
            for table, kind in kinds
            for name, desc in table.items()
        }
        self.model = model
        self.series = {}
        self.published: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()  # requests are counted on Triton's thread, the rest on the engine's
        self.publishing = threading.Lock()  # one flush at a time; counting does not wait for it

    def inc(self, name: str, adapter: str = "", value: float = 1.0) -> None:
        with self.lock:
            super().inc(name, adapter, value)

    def set_max(self, name: str, value: float) -> None:
        with self.lock:
            super().set_max(name, value)

    def gauge(self, name: str, value: float) -> None:
        with self.lock:
            super().gauge(name, value)

    def flush(self) -> None:
        with self.publishing:
            with self.lock:
                changed = [(key, value, self.published.get(key, 0.0)) for key, value in self.values.items()]
                changed = [c for c in changed if c[1] != c[2]]
                self.published.update((key, value) for key, value, _ in changed)
            for (name, adapter), value, before in changed:
                metric = self._metric(name, adapter)
                if name in GAUGES:
                    metric.set(value)
                else:
                    metric.increment(value - before)

    def _metric(self, name: str, adapter: str):
        key = (name, adapter)
        if key not in self.series:
            labels = {"model": self.model, **({"adapter": adapter} if adapter else {})}
            self.series[key] = self.families[name].Metric(labels=labels)
        return self.series[key]
