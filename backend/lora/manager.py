"""Adapter tiers. Device: the slots of the stacked buffers the kernels read (max_loras of them, each
sized for max_lora_rank). Host: adapters as read from disk, under a byte budget (host_lora_memory).
Disk: the adapter folders, the source of truth. Each tier evicts its least recently used adapter
first; a slot that a running sequence holds is never evicted, nor is a pinned adapter.

Reads from disk (and their checks and hash) run on a loader thread: the engine keeps stepping, and a
request whose adapter is loading waits without holding back the others. A request sees the folder as
it was when it arrived (`want`): a version read before that, whose files have changed since, is not
served to it; a new read is. Running sequences keep the slot, and so the weights, they started with."""

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from backend.errors import RequestError, internal, invalid
from backend.lora.adapters import Adapter, AdapterStore, Stamp, stamp_bytes
from backend.lora.layers import LoRAContext
from backend.metrics import Metrics

log = logging.getLogger("lora_engine")


@dataclass(frozen=True)
class Want:
    """What a request asks of an adapter: its name, and its files as they were when it arrived."""

    name: str
    stamp: Stamp
    seen: float  # time.monotonic() before the files were looked at

    def served_by(self, adapter: Adapter) -> bool:
        return adapter.stamp == self.stamp or adapter.read_at >= self.seen


@dataclass(frozen=True)
class Failure:
    error: RequestError
    stamp: Stamp | None
    read_at: float


@dataclass(eq=False)
class Slot:
    index: int
    adapter: Adapter | None = None
    refs: int = 0  # running (or preempted) sequences that use it
    used: int = 0  # tick of its last acquire
    pinned: bool = False
    nbytes: int = 0  # its adapter's values at their own rank, in the slot buffers' dtype


class HostTier:
    """Adapters read from disk, least recently used first, within `budget` bytes. A read reserves its
    bytes before it starts, so the budget holds while reads are under way."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: OrderedDict[str, Adapter] = OrderedDict()
        self.reserved: dict[str, int] = {}

    @property
    def used(self) -> int:
        return sum(a.nbytes for a in self.entries.values()) + sum(self.reserved.values())

    def get(self, name: str) -> Adapter | None:
        if name in self.entries:
            self.entries.move_to_end(name)
        return self.entries.get(name)

    def reserve(self, name: str, nbytes: int, keep: set[str]) -> list[str] | None:
        """Room for `nbytes` more, evicting least recently used adapters not in `keep`; the names
        evicted, or None (nothing evicted) if there cannot be room now."""
        free = self.budget - self.used
        victims = []
        for other, adapter in self.entries.items():
            if free >= nbytes:
                break
            if other not in keep:
                victims.append(other)
                free += adapter.nbytes
        if free < nbytes:
            return None
        for other in victims:
            del self.entries[other]
        self.reserved[name] = nbytes
        return victims

    def put(self, adapter: Adapter) -> None:
        self.reserved.pop(adapter.name, None)
        self.entries[adapter.name] = adapter
        self.entries.move_to_end(adapter.name)

    def drop(self, name: str) -> Adapter | None:
        self.reserved.pop(name, None)
        return self.entries.pop(name, None)


class Loader:
    """Reads adapters on its own thread. It runs no torch op that computes (only views of the bytes
    read), so it brings no second OpenMP team; file reads and hashing release the GIL."""

    def __init__(self, store: AdapterStore, wake: threading.Event):
        self.store, self.wake = store, wake
        self.jobs: queue.Queue[str | None] = queue.Queue()
        self.done: queue.Queue[tuple[str, Adapter | RequestError, float, float]] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="lora-adapter-loader", daemon=True)
        self.thread.start()

    def submit(self, name: str) -> None:
        self.jobs.put(name)

    def finished(self) -> list[tuple[str, Adapter | RequestError, float, float]]:
        """(name, adapter or error, time.monotonic() at the start, seconds) of each read done."""
        out = []
        while not self.done.empty():
            out.append(self.done.get_nowait())
        return out

    def close(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while (name := self.jobs.get()) is not None:
            began, start = time.monotonic(), time.perf_counter()
            try:
                result: Adapter | RequestError = self.store.load(name)
            except RequestError as e:
                result = e
            except Exception as e:  # a bug in a read fails that adapter's requests, not the loader
                log.exception("reading adapter %s failed", name)
                result = internal(f"reading LoRA adapter '{name}' failed: {e}")
            self.done.put((name, result, began, time.perf_counter() - start))
            self.wake.set()


class AdapterManager:
    """The engine's view of the tiers. All methods but `want` run on the engine thread."""

    def __init__(
        self,
        store: AdapterStore,
        lora: LoRAContext,
        num_slots: int,
        host_budget: int,
        metrics: Metrics,
        pinned: tuple[str, ...] = (),
        wake: threading.Event | None = None,
    ):
        if len(pinned) >= num_slots:
            raise ValueError(f"{len(pinned)} pinned adapters leave none of the {num_slots} slots (max_loras) free")
        self.store, self.lora, self.metrics = store, lora, metrics
        self.slots = [Slot(i) for i in range(num_slots)]
        self.by_name: dict[str, Slot] = {}  # the newest version of each adapter in a slot
        self.host = HostTier(host_budget)
        self.pinned = set(pinned)
        self.loading: dict[str, Want] = {}
        self.failed: dict[str, Failure] = {}
        self.closed: set[Slot] = set()  # slots kept from new requests this round, to free up for older ones
        self.wanted: set[str] = set()
        self.tick = 0
        weights = list({id(layer.w): layer.w for layer in lora.layers.values()}.values())
        self.slot_bytes = sum(w.nbytes for w in weights)
        self.itemsize = weights[0].a.element_size() if weights else 0
        self.changed = True  # the tier gauges need publishing
        self.loader = Loader(store, wake or threading.Event())
        self.pinned_bytes = 0
        for name in pinned:
            self._fill(self._free_slot(), self.load_now(name))
        self.pinned_bytes = sum(self.host.entries[name].nbytes for name in pinned)
        self._publish()

    # ------------------------------------------------------------------ called on Triton's threads

    def want(self, name: str) -> Want:
        """Raises NOT_FOUND (no folder) or INVALID_ARG (bad name, too big for the host tier) at once."""
        seen = time.monotonic()
        stamp = self.store.stamp(name)
        nbytes = stamp_bytes(stamp)
        room = self.host.budget - self.pinned_bytes
        if nbytes > room:
            raise invalid(
                f"LoRA adapter '{name}' is {nbytes} bytes on disk, more than the {room} bytes of host_lora_memory "
                "left for it (after pinned adapters)"
            )
        return Want(name, stamp, seen)

    # ------------------------------------------------------------------ called on the engine thread

    def begin_round(self, wants: list[Want]) -> None:
        """Before an admission round: takes in finished reads; `wants` are the waiting requests'."""
        self.closed = set()
        self.wanted = {w.name for w in wants} | self.pinned
        finished = self.loader.finished()
        for name, result, began, seconds in finished:
            want = self.loading.pop(name)
            if isinstance(result, Adapter):
                self._loaded(result, seconds)
            else:
                self.host.drop(name)
                self.failed[name] = Failure(result, want.stamp, began)
                self.metrics.inc("lora_adapter_load_failures_total", adapter=name)
        if finished or self.changed:
            self._publish()

    def acquire(self, want: Want) -> tuple[int, Adapter] | None:
        """A slot holding a version of the adapter that serves `want` (the caller holds it until
        `release`), or None while it loads or waits for a slot. Raises the read's error, if it failed."""
        failure = self.failed.get(want.name)
        if failure and (failure.stamp == want.stamp or failure.read_at >= want.seen):
            raise failure.error
        slot = self.by_name.get(want.name)
        if slot is not None and want.served_by(slot.adapter):
            if slot in self.closed:
                return None
            self.host.get(want.name)  # a use: its host copy, if any, becomes the most recent
            return self._take(slot, "device")
        adapter = self.host.get(want.name)
        if adapter is None or not want.served_by(adapter):
            self._read(want)
            return None
        slot = self._free_slot()
        if slot is None:
            self._close_one()
            return None
        self._fill(slot, adapter)
        return self._take(slot, "host")

    def release(self, slot: int) -> None:
        self.slots[slot].refs -= 1

    @property
    def slots_in_use(self) -> int:
        return sum(s.refs > 0 for s in self.slots)

    def resident(self) -> set[str]:
        """The adapters in device slots, in use or idle."""
        return {s.adapter.name for s in self.slots if s.adapter is not None}

    def load_now(self, name: str) -> Adapter:
        """Reads an adapter on this thread into the host tier (pinned adapters at start; tests)."""
        start = time.perf_counter()
        adapter = self.store.load(name)
        if not self._make_room(name, adapter.nbytes, self.wanted | {name}):
            raise invalid(f"LoRA adapter '{name}' ({adapter.nbytes} bytes) does not fit host_lora_memory")
        self._loaded(adapter, time.perf_counter() - start)
        self._publish()
        return adapter

    def close(self) -> None:
        self.loader.close()

    # ------------------------------------------------------------------ inside

    def _take(self, slot: Slot, tier: str) -> tuple[int, Adapter]:
        self.tick += 1
        slot.refs += 1
        slot.used = self.tick
        self.metrics.inc("lora_cache_hits_total", adapter=slot.adapter.name, tier=tier)
        return slot.index, slot.adapter

    def _read(self, want: Want) -> None:
        """Starts reading the adapter unless a read that will serve `want` is under way."""
        if want.name in self.loading:
            return
        stale = self.host.drop(want.name)
        if stale is not None:
            self.metrics.gauge("lora_adapter_resident_bytes", 0, adapter=want.name, tier="host")
        if not self._make_room(want.name, stamp_bytes(want.stamp), self.wanted):
            return  # the host tier is full of adapters waiting requests need: read once they have run
        self.loading[want.name] = want
        self.changed = True
        self.metrics.inc("lora_cache_misses_total", adapter=want.name)
        self.loader.submit(want.name)

    def _make_room(self, name: str, nbytes: int, keep: set[str]) -> bool:
        """Reserves host bytes for a read of `name`, evicting (and counting) what it must; False if it cannot."""
        evicted = self.host.reserve(name, nbytes, keep)
        for other in evicted or []:
            self._evicted(other, "host")
        return evicted is not None

    def _loaded(self, adapter: Adapter, seconds: float) -> None:
        name = adapter.name
        self.failed.pop(name, None)
        old = self.by_name.get(name)
        if old is not None and old.adapter.version != adapter.version:
            self.metrics.inc("lora_adapter_updates_total", adapter=name)
        self.host.put(adapter)
        self.metrics.inc("lora_adapter_loads_total", adapter=name)
        self.metrics.observe("lora_adapter_load_seconds", seconds, adapter=name)
        self.metrics.gauge("lora_adapter_resident_bytes", adapter.nbytes, adapter=name, tier="host")

    def _free_slot(self) -> Slot | None:
        """An empty slot, else an idle one: an outdated version first, then the least recently used."""
        idle = [s for s in self.slots if s.refs == 0 and not s.pinned]
        empty = [s for s in idle if s.adapter is None]
        if empty:
            return empty[0]
        outdated = [s for s in idle if self.by_name.get(s.adapter.name) is not s]
        if outdated or idle:
            return min(outdated or idle, key=lambda s: s.used)
        return None

    def _close_one(self) -> None:
        """Every slot is busy: the least recently used one takes no new requests until it frees up,
        so that an older request waiting for a slot gets one (later requests join open slots)."""
        open_slots = [s for s in self.slots if s not in self.closed and not s.pinned]
        if open_slots:
            self.closed.add(min(open_slots, key=lambda s: s.used))

    def _fill(self, slot: Slot, adapter: Adapter) -> None:
        if slot.adapter is not None:
            if self.by_name.get(slot.adapter.name) is slot:
                del self.by_name[slot.adapter.name]
            self._evicted(slot.adapter.name, "device")
        for module, layer in self.lora.layers.items():
            m = adapter.modules.get(module)
            layer.set_slot(slot.index, m and m.a, m and m.b, m.scale if m else 0.0, m and m.g)
        old = self.by_name.get(adapter.name)
        if old is not None:
            old.pinned = False  # an outdated version: freed once its sequences are done
        slot.adapter, slot.pinned = adapter, adapter.name in self.pinned
        slot.nbytes = sum(m.a.numel() + m.b.numel() for m in adapter.modules.values()) * self.itemsize
        self.by_name[adapter.name] = slot
        self.metrics.gauge("lora_adapter_resident_bytes", slot.nbytes, adapter=adapter.name, tier="device")
        self.changed = True

    def _evicted(self, name: str, tier: str) -> None:
        self.metrics.inc("lora_adapter_evictions_total", adapter=name, tier=tier)
        self.metrics.gauge("lora_adapter_resident_bytes", 0, adapter=name, tier=tier)
        self.changed = True

    def _publish(self) -> None:
        self.changed = False
        resident = [s for s in self.slots if s.adapter is not None]
        self.metrics.gauge("lora_tier_bytes", sum(s.nbytes for s in resident), tier="device")
        self.metrics.gauge("lora_tier_adapters", len(resident), tier="device")
        self.metrics.gauge("lora_tier_budget_bytes", self.slot_bytes, tier="device")
        self.metrics.gauge("lora_tier_bytes", self.host.used, tier="host")
        self.metrics.gauge("lora_tier_adapters", len(self.host.entries), tier="host")
        self.metrics.gauge("lora_tier_budget_bytes", self.host.budget, tier="host")
        self.metrics.gauge("lora_adapter_loads_in_flight", len(self.loading))
