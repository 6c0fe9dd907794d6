"""The slot table: which adapter sits in which slot of the LoRA layers, with LRU reuse of idle slots."""

import time
from collections import OrderedDict

from backend.adapters import Adapter, AdapterStore
from backend.lora_layers import LoRAContext
from backend.metrics import Metrics


class AdapterManager:
    def __init__(self, store: AdapterStore, lora: LoRAContext, num_slots: int, metrics: Metrics):
        self.store = store
        self.lora = lora
        self.metrics = metrics
        self.slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.refs = [0] * num_slots
        self.free = list(range(num_slots - 1, -1, -1))
        self.host: dict[str, Adapter] = {}  # adapters read from disk (tiered eviction: later)

    def acquire(self, name: str) -> int | None:
        """Slot holding `name`, loading it if needed; None while every slot is busy.
        Raises RequestError (NOT_FOUND, INVALID_ARG) for an unknown or invalid adapter."""
        if name in self.slots:
            self.slots.move_to_end(name)
            slot = self.slots[name]
            self.metrics.adapter_cache(name, hit=True)
        else:
            slot = self._free_slot()
            if slot is None:
                return None
            try:
                self._fill(slot, self._host_copy(name))
            except Exception:
                self.free.append(slot)
                raise
            self.slots[name] = slot
            self.metrics.adapter_cache(name, hit=False)
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1

    @property
    def slots_in_use(self) -> int:
        return sum(r > 0 for r in self.refs)

    def _host_copy(self, name: str) -> Adapter:
        if name not in self.host:
            start = time.perf_counter()
            self.host[name] = self.store.load(name)
            self.metrics.adapter_loaded(name, time.perf_counter() - start)
        return self.host[name]

    def _free_slot(self) -> int | None:
        if self.free:
            return self.free.pop()
        for name, slot in self.slots.items():
            if self.refs[slot] == 0:
                del self.slots[name]
                self.metrics.adapter_evicted(name)
                return slot
        return None

    def _fill(self, slot: int, adapter: Adapter) -> None:
        for module, layer in self.lora.layers.items():
            m = adapter.modules.get(module)
            layer.set_slot(slot, m and m.a, m and m.b, m.scale if m else 0.0)
