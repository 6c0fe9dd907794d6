"""Adapter tiers in the engine, step by step: the host tier's byte budget and LRU order, the admission
order when adapters outnumber slots, and decoding that goes on while an adapter is read from disk."""

import statistics
import threading
import time

import pytest

from backend.engine.engine import Output
from backend.lora.adapters import AdapterStore
from demo.builders import build_adapter, build_model
from tests.conftest import NEVER, peft_generate
from tests.test_engine import Collector, drive, make_engine, prompts, request, warm


def file_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def test_the_host_tier_keeps_its_budget_and_evicts_the_least_recently_used(assets, peft_model, vocab, engines):
    root = assets / "adapters"
    small, medium, big = "qv-r4", "attn-r8-rslora", "mlp-r64"
    budget = file_bytes(root / small) + file_bytes(root / big) + 1024  # no room for all three
    engine = make_engine(assets / "base", root, max_loras=4, host_lora_memory=str(budget))
    engines.append(engine)
    p = prompts(vocab, [5], seed=3)[0]
    for name in (small, medium, small, big):  # small is then more recent than medium: medium goes
        c = Collector()
        engine.submit(request(p, name, 3), c)
        drive(engine, [c])
        assert c.final.token_ids == peft_generate(peft_model, p, name, 3)
        assert engine.adapters.host.used <= budget
    assert list(engine.adapters.host.entries) == [small, big]
    m = engine.metrics
    assert m.get("lora_adapter_evictions_total", adapter=medium, tier="host") == 1
    assert m.get("lora_adapter_evictions_total", adapter=small, tier="host") == 0
    assert m.get("lora_tier_bytes", tier="host") == engine.adapters.host.used <= budget
    # still in a device slot: served without a read
    c = Collector()
    engine.submit(request(p, medium, 3), c)
    drive(engine, [c])
    assert c.final.token_ids == peft_generate(peft_model, p, medium, 3)
    assert m.get("lora_cache_hits_total", adapter=medium, tier="device") == 1
    assert m.get("lora_adapter_loads_total", adapter=medium) == 1
    # an adapter larger than the whole budget is refused at once, with the numbers
    tiny = make_engine(assets / "base", root, host_lora_memory="1000")
    engines.append(tiny)
    with pytest.raises(Exception, match=r"LoRA adapter 'qv-r4' is \d+ bytes on disk, more than the 1000 bytes"):
        tiny.submit(request(p, small, 3), Collector())


def test_pinned_adapters_that_cannot_be_served_fail_the_load(assets):
    with pytest.raises(ValueError, match="2 pinned adapters leave none of the 2 slots"):
        make_engine(assets / "base", assets / "adapters", max_loras=2, pinned_loras="qv-r4,mlp-r64")
    with pytest.raises(Exception, match="LoRA adapter 'nope' not found"):
        make_engine(assets / "base", assets / "adapters", pinned_loras="qv-r4, nope")


def test_a_request_waiting_for_a_slot_is_not_starved_by_later_ones(assets, peft_model, vocab, engines):
    """max_loras 2, both slots busy (A, B) and fed a new request every step. X waits: A's slot (the least
    recently used) takes no new requests until it frees up, then X runs. B's keep joining meanwhile."""
    a, b, x = "qv-r4", "mlp-r64", "all-r16-pattern"
    engine = warm(make_engine(assets / "base", assets / "adapters", max_loras=2, max_num_seqs=16), a, b, x)
    engines.append(engine)
    ps = prompts(vocab, [5] * 64, seed=11)
    first = {name: Collector() for name in (a, b)}
    engine.submit(request(ps[0], a, 6), first[a])
    engine.step()
    engine.submit(request(ps[1], b, 40), first[b])
    engine.step()
    cx = Collector()
    engine.submit(request(ps[2], x, 3), cx)
    later: list[tuple[str, Collector, int]] = []
    admitted: dict[int, int] = {}  # id(collector) -> step it joined
    step = 0
    while not cx.done.is_set() and step < 100:
        for name in (a, b):
            c = Collector()
            engine.submit(request(ps[3 + len(later)], name, 6), c)
            later.append((name, c, step))
        engine.step()
        step += 1
        for seq in engine.running:
            admitted.setdefault(id(seq.emit), step)
    assert cx.done.is_set() and cx.final.error is None
    x_step = admitted[id(cx)]
    a_after = [admitted.get(id(c)) for name, c, _ in later if name == a]
    b_after = [admitted.get(id(c)) for name, c, _ in later if name == b]
    assert all(s is None or s >= x_step for s in a_after), "an A request that came after X ran before it"
    assert any(s is not None and s < x_step for s in b_after), "B's requests did not keep joining"
    assert x_step <= 8, f"X waited {x_step} steps"
    assert cx.final.token_ids == peft_generate(peft_model, ps[2], x, 3)
    drive(engine, [c for _, c, _ in later] + list(first.values()), max_steps=400)
    assert all(c.final.error is None for _, c, _ in later)


class Timed(Collector):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def __call__(self, out: Output) -> None:
        self.times += [time.monotonic()] * len(out.token_ids)
        super().__call__(out)


def test_decoding_goes_on_while_an_adapter_is_read(tmp_path, monkeypatch, engines):
    """A cold read of a rank-64 all-linear adapter from a slow disk (each file read takes 0.25 s more):
    the running sequence's tokens keep coming at their usual pace, and the adapter request then runs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = build_model(tmp_path / "base", vocab_size=512, max_position_embeddings=4096)  # room to run long
    build_adapter(base_dir, tmp_path / "adapters" / "big", seed=5, r=64, lora_alpha=32, target_modules="all-linear")
    read = AdapterStore._read

    def slow_read(self, *args):
        time.sleep(0.25)
        return read(self, *args)

    monkeypatch.setattr(AdapterStore, "_read", slow_read)
    engine = make_engine(base_dir, tmp_path / "adapters").start()
    engines.append(engine)
    p_run, p_new = prompts(512, [6, 6], seed=13)
    running, cold, stop = Timed(), Timed(), threading.Event()
    engine.submit(request(p_run, "", 3000, stream=True, end_id=NEVER, is_cancelled=stop.is_set), running)
    while len(running.times) < 10:
        time.sleep(0.005)
    sent = time.monotonic()
    engine.submit(request(p_new, "big", 4, stream=True), cold)
    assert cold.done.wait(30)
    stop.set()  # the running sequence has shown what it had to
    assert running.done.wait(30) and running.final.error.code == "CANCELLED"
    assert cold.final.error is None
    first = cold.times[0]
    during = [t for t in running.times if sent <= t <= first]
    gaps = [b - a for a, b in zip(during, during[1:])]
    before = [b - a for a, b in zip(running.times[:10], running.times[1:10])]
    print(
        f"\ncold read {first - sent:.2f} s (slow disk: 2 x 0.25 s); {len(during)} tokens of the running "
        f"sequence meanwhile; gap median {statistics.median(gaps) * 1e3:.1f} ms, max {max(gaps) * 1e3:.1f} ms "
        f"(before the read: median {statistics.median(before) * 1e3:.1f} ms)"
    )
    assert first - sent >= 0.5 and len(during) >= 20 and running.times[-1] > first
    assert max(gaps) < 0.25, "the running sequence paused during the read"
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "adapters" / "big", adapter_name="big").eval()
    assert cold.token_ids == peft_generate(model, p_new, "big", 4)
    assert engine.metrics.get("lora_adapter_load_seconds_count", adapter="big") == 1


def residency(engine) -> dict[str, str]:
    engine.report()
    return dict(engine.metrics.lora_info)


def test_residency_lists_the_adapters_in_slots_and_those_waiting_for_one(assets, vocab, engines):
    """vllm:lora_requests_info: running = in a device slot, idle or busy; waiting = named by a queued
    request and not in a slot. An adapter evicted from its slot leaves the list."""
    a, b, c = "qv-r4", "mlp-r64", "all-r16-pattern"
    engine = make_engine(assets / "base", assets / "adapters", max_loras=2)
    engines.append(engine)
    assert residency(engine) == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    p = prompts(vocab, [5], seed=4)[0]
    first = Collector()
    engine.submit(request(p, a, 2), first)
    assert not engine.step()  # a is read on the loader's thread: nothing runs yet
    assert residency(engine)["waiting_lora_adapters"] == a
    drive(engine, [first])
    assert residency(engine) == {"max_lora": "2", "running_lora_adapters": a, "waiting_lora_adapters": ""}
    for name in (b, c):  # c takes a's slot, the least recently used
        done = Collector()
        engine.submit(request(p, name, 2), done)
        drive(engine, [done])
    info = residency(engine)
    assert info["running_lora_adapters"] == ",".join(sorted([b, c])) and info["waiting_lora_adapters"] == ""
    assert engine.metrics.get("lora_adapter_evictions_total", adapter=a, tier="device") == 1
    stamp = engine.metrics.lora_info_time
    assert residency(engine) == info and engine.metrics.lora_info_time == stamp  # no change, no new time
