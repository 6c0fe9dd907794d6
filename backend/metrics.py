"""Engine, adapter and tier metrics. `Metrics` keeps them in memory; `TritonMetrics` also publishes
them through Triton's metrics endpoint (pb_utils custom metrics) on `flush`: each publication is a
round trip to the server process, too slow to make for every token.

A series is a family name and its labels. The series without an adapter label exist from the start
(at 0); an adapter's series all appear, at 0, with its first request, so a dashboard never misses one.

The `vllm:` families carry vLLM's names and labels, for routers that read them (llm-d's endpoint
picker); docs/metrics.md "Routing signals" says where they differ from vLLM's."""

import threading
import time
from collections import defaultdict

BASE = "__base__"  # label of requests without an adapter (not a valid adapter name)
TIERS = ("device", "host")
LOAD_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

Labels = tuple[tuple[str, str], ...]

# family name -> description
COUNTERS = {
    "lora_requests_total": "Requests received, per adapter",
    "lora_generated_tokens_total": "Tokens generated, per adapter",
    "lora_cache_hits_total": "Admissions that found the adapter in a tier: device (in a slot) or host (in memory)",
    "lora_cache_misses_total": "Admissions whose adapter had to be read from disk (first use, evicted, or updated)",
    "lora_adapter_loads_total": "Adapter reads from disk that succeeded",
    "lora_adapter_load_failures_total": "Adapter reads from disk that failed (the adapter's requests got the error)",
    "lora_adapter_updates_total": "Reads that found a new version of an adapter already cached",
    "lora_adapter_evictions_total": "Adapters evicted from a tier (device slot or host memory)",
    "lora_engine_steps_total": "Engine steps (one forward over the running batch)",
    "lora_engine_mixed_steps_total": "Engine steps whose batch held more than one adapter (the base counts as one)",
    "lora_engine_preemptions_total": "Running sequences preempted (fed again later) because the KV cache was full",
    "lora_engine_prefix_cache_queries_total": "Tokens of admitted sequences looked up in the prefix cache",
    "lora_engine_prefix_cache_hits_total": "Of those, tokens found: their K/V were not computed again",
}
GAUGES = {
    "lora_engine_max_adapters_per_step": "Most distinct adapters (the base counts as one) seen in one engine step",
    "lora_engine_running_sequences": "Sequences in the running batch",
    "lora_engine_waiting_requests": "Requests queued for a running place, KV-cache blocks, an adapter load or slot",
    "lora_kv_cache_blocks_in_use": "KV-cache blocks held by running sequences",
    "lora_prefix_cache_blocks": "Full KV-cache blocks findable by their token chain (held or free, until reused)",
    "lora_prefix_cache_hit_rate": "Prefix-cache hits over queries, in tokens, since the start",
    "lora_adapter_slots_in_use": "Adapter slots held by running sequences",
    "lora_adapter_loads_in_flight": "Adapter reads from disk under way",
    "lora_tier_bytes": "Bytes of adapter weights resident in a tier (device: at their real rank)",
    "lora_tier_budget_bytes": "A tier's budget: host_lora_memory, or the device slots' buffers",
    "lora_tier_adapters": "Adapters resident in a tier",
    "lora_adapter_resident_bytes": "Bytes of an adapter resident in a tier (0 when it is not there)",
    "lora_adapter_merged": "1 for the adapter merged into the served weights (merged_loras)",
    "vllm:num_requests_running": "Sequences in the running batch (as lora_engine_running_sequences)",
    "vllm:num_requests_waiting": "Requests queued in the engine (as lora_engine_waiting_requests)",
    "vllm:kv_cache_usage_perc": "Fraction of KV-cache blocks in use, 0 to 1",
    "vllm:cache_config_info": "The KV cache: block_size (tokens), num_gpu_blocks (blocks on its device); value 1",
}
LORA_INFO = "vllm:lora_requests_info"  # published apart: one live label set
LORA_INFO_HELP = (
    "Adapters by residency: running_lora_adapters are in device slots (busy or idle), waiting_lora_adapters "
    "have queued requests and are not in a slot; value: Unix time of the last change"
)
HISTOGRAMS = {
    "lora_adapter_load_seconds": "Seconds to read, check and hash an adapter from disk",
}
FAMILIES = {**COUNTERS, **GAUGES, **HISTOGRAMS}

# the series of each adapter, created together with its first request (the base: the first two)
PER_ADAPTER = [
    ("lora_requests_total", ()),
    ("lora_generated_tokens_total", ()),
    *[("lora_cache_hits_total", (("tier", t),)) for t in TIERS],
    ("lora_cache_misses_total", ()),
    ("lora_adapter_loads_total", ()),
    ("lora_adapter_load_failures_total", ()),
    ("lora_adapter_updates_total", ()),
    *[("lora_adapter_evictions_total", (("tier", t),)) for t in TIERS],
    *[("lora_adapter_resident_bytes", (("tier", t),)) for t in TIERS],
    ("lora_adapter_load_seconds", ()),
]
TIER_GAUGES = ("lora_tier_bytes", "lora_tier_budget_bytes", "lora_tier_adapters")
LABELLED = (*TIER_GAUGES, "lora_adapter_resident_bytes", "lora_adapter_merged", "vllm:cache_config_info")
# the series that exist from the start; the load-time histogram also has one over all adapters
GLOBAL = [
    *[(name, ()) for name in COUNTERS if name.startswith("lora_engine_")],
    *[(name, ()) for name in GAUGES if name not in LABELLED],
    *[(name, (("tier", t),)) for name in TIER_GAUGES for t in TIERS],
    ("lora_adapter_load_seconds", ()),
]


def labels(adapter: str = "", **more: str) -> Labels:
    return ((("adapter", adapter),) if adapter else ()) + tuple(sorted(more.items()))


class Metrics:
    def __init__(self):
        self.values: dict[tuple[str, Labels], float] = defaultdict(float)
        self.histograms: dict[tuple[str, Labels], list[float]] = {}  # observations not yet published
        self.adapters: set[str] = set()
        self.lora_info: Labels | None = None  # the one live label set of vllm:lora_requests_info
        self.lora_info_time = 0.0
        for name, extra in GLOBAL:
            self._create(name, extra)

    def _create(self, name: str, key_labels: Labels) -> None:
        if name in HISTOGRAMS:
            self.histograms.setdefault((name, key_labels), [])
            self.values[name + "_count", key_labels] += 0
        else:
            self.values[name, key_labels] += 0

    def _adapter(self, adapter: str) -> None:
        if adapter not in self.adapters:
            self.adapters.add(adapter)
            for name, extra in PER_ADAPTER:
                if adapter != BASE or name in ("lora_requests_total", "lora_generated_tokens_total"):
                    self._create(name, labels(adapter) + extra)

    def inc(self, name: str, value: float = 1.0, adapter: str = "", **more: str) -> None:
        if adapter:
            self._adapter(adapter)
        self.values[name, labels(adapter, **more)] += value

    def set_max(self, name: str, value: float) -> None:
        self.values[name, ()] = max(self.values[name, ()], value)

    def gauge(self, name: str, value: float, adapter: str = "", **more: str) -> None:
        if adapter:
            self._adapter(adapter)
        self.values[name, labels(adapter, **more)] = value

    def observe(self, name: str, value: float, adapter: str = "") -> None:
        """One observation of a histogram, in the adapter's series and the one without an adapter."""
        if adapter:
            self._adapter(adapter)
        for key_labels in {labels(adapter), ()}:
            self.histograms.setdefault((name, key_labels), []).append(value)
            self.values[name + "_count", key_labels] += 1
            self.values[name + "_sum", key_labels] += value

    def get(self, name: str, adapter: str = "", **more: str) -> float:
        return self.values.get((name, labels(adapter, **more)), 0.0)

    def total(self, name: str) -> float:
        """Sum over every series of a family (every adapter, every tier)."""
        return sum(v for (n, _), v in list(self.values.items()) if n == name)

    def flush(self) -> None:
        """Publishes what changed since the last flush (here: nothing to publish)."""
        for pending in self.histograms.values():
            pending.clear()

    def request(self, adapter: str) -> None:
        self.inc("lora_requests_total", adapter=adapter or BASE)

    def tokens(self, adapter: str, n: int) -> None:
        self.inc("lora_generated_tokens_total", n, adapter=adapter or BASE)

    def step(self, adapters: set[str]) -> None:
        self.inc("lora_engine_steps_total")
        if len(adapters) > 1:
            self.inc("lora_engine_mixed_steps_total")
        self.set_max("lora_engine_max_adapters_per_step", len(adapters))

    def occupancy(self, running: int, slots: int, waiting: int, kv_blocks: int, kv_total: int) -> None:
        self.gauge("lora_engine_running_sequences", running)
        self.gauge("lora_kv_cache_blocks_in_use", kv_blocks)
        self.gauge("lora_adapter_slots_in_use", slots)
        self.gauge("lora_engine_waiting_requests", waiting)
        self.gauge("vllm:num_requests_running", running)
        self.gauge("vllm:num_requests_waiting", waiting)
        self.gauge("vllm:kv_cache_usage_perc", kv_blocks / kv_total)

    def prefix_cache(self, cached_blocks: int) -> None:
        self.gauge("lora_prefix_cache_blocks", cached_blocks)
        queries = self.values["lora_engine_prefix_cache_queries_total", ()]
        hits = self.values["lora_engine_prefix_cache_hits_total", ()]
        self.gauge("lora_prefix_cache_hit_rate", hits / queries if queries else 0.0)

    def cache_config(self, block_size: int, num_blocks: int) -> None:
        self.gauge("vllm:cache_config_info", 1, block_size=str(block_size), num_gpu_blocks=str(num_blocks))

    def lora_residency(self, max_lora: int, resident: set[str], wanted: set[str]) -> None:
        """resident: the adapters in device slots; wanted: those that queued requests name. Mixes are left out:
        their names hold commas, which the label's comma-separated list cannot."""
        resident, wanted = {n for n in resident if "," not in n}, {n for n in wanted if "," not in n}
        info = labels(
            max_lora=str(max_lora),
            running_lora_adapters=",".join(sorted(resident)),
            waiting_lora_adapters=",".join(sorted(wanted - resident)),
        )
        if info != self.lora_info:
            self.lora_info, self.lora_info_time = info, time.time()


class TritonMetrics(Metrics):
    """Publishes every series as a Triton custom metric labelled with the model (and adapter, tier)."""

    def __init__(self, pb_utils, model: str):
        self.lock = threading.Lock()  # requests are counted on Triton's thread, the rest on the engine's
        self.publishing = threading.Lock()  # one flush at a time; counting does not wait for it
        kinds = [
            (COUNTERS, pb_utils.MetricFamily.COUNTER),
            (GAUGES, pb_utils.MetricFamily.GAUGE),
            (HISTOGRAMS, pb_utils.MetricFamily.HISTOGRAM),
        ]
        self.families = {
            name: pb_utils.MetricFamily(name=name, description=desc, kind=kind)
            for table, kind in kinds
            for name, desc in table.items()
        }
        self.model = model
        self.series = {}
        self.published: dict[tuple[str, Labels], float] = {}
        self.pb_utils = pb_utils
        self.info_published: tuple[Labels | None, float] = (None, 0.0)
        self.info_family = self.info_series = None
        super().__init__()

    def inc(self, name: str, value: float = 1.0, adapter: str = "", **more: str) -> None:
        with self.lock:
            super().inc(name, value, adapter, **more)

    def set_max(self, name: str, value: float) -> None:
        with self.lock:
            super().set_max(name, value)

    def gauge(self, name: str, value: float, adapter: str = "", **more: str) -> None:
        with self.lock:
            super().gauge(name, value, adapter, **more)

    def observe(self, name: str, value: float, adapter: str = "") -> None:
        with self.lock:
            super().observe(name, value, adapter)

    def lora_residency(self, max_lora: int, resident: set[str], wanted: set[str]) -> None:
        with self.lock:
            super().lora_residency(max_lora, resident, wanted)

    def flush(self) -> None:
        with self.publishing:
            with self.lock:
                changed = [
                    (key, value, self.published.get(key, 0.0))
                    for key, value in self.values.items()
                    if key[0] in FAMILIES and (key not in self.series or value != self.published.get(key, 0.0))
                ]
                self.published.update((key, value) for key, value, _ in changed)
                observed = [(key, list(pending)) for key, pending in self.histograms.items()]
                new_histograms = [key for key, _ in observed if key not in self.series]
                info = (self.lora_info, self.lora_info_time)
                for pending in self.histograms.values():
                    pending.clear()
            for (name, key_labels), value, before in changed:
                metric = self._metric(name, key_labels)
                if name in GAUGES:
                    metric.set(value)
                elif value != before:
                    metric.increment(value - before)
            for key in new_histograms:
                self._metric(*key)
            for key, pending in observed:
                for value in pending:
                    self.series[key].observe(value)
            if info[0] is not None and info != self.info_published:
                self._publish_lora_info(*info)

    def _publish_lora_info(self, info: Labels, stamp: float) -> None:
        """One live series: a family keeps every label set it made, so a new label set gets a new family.
        The old one leaves /metrics once nothing refers to it (it has no reference cycles)."""
        if info != self.info_published[0]:
            self.info_series = self.info_family = None
            gauge = self.pb_utils.MetricFamily.GAUGE
            self.info_family = self.pb_utils.MetricFamily(name=LORA_INFO, description=LORA_INFO_HELP, kind=gauge)
            self.info_series = self.info_family.Metric(labels={"model": self.model, **dict(info)})
        self.info_series.set(stamp)
        self.info_published = (info, stamp)

    def _metric(self, name: str, key_labels: Labels):
        key = (name, key_labels)
        if key not in self.series:
            family = self.families[name]
            all_labels = {"model": self.model, **dict(key_labels)}
            if name in HISTOGRAMS:
                self.series[key] = family.Metric(labels=all_labels, buckets=LOAD_BUCKETS)
            else:
                self.series[key] = family.Metric(labels=all_labels)
        return self.series[key]
