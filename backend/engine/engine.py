"""Continuous batching: requests join the running batch between steps and leave as they finish.

One step = one forward over every running sequence: a decode token each, and prompt chunks of at most
max_prefill_tokens in all, shortest prompt first, so a long prompt neither holds back the decoding nor
a short prompt behind it. Each running sequence holds KV-cache blocks for its tokens and, if it names
an adapter, a LoRA slot. A sequence whose first full blocks of tokens were computed before, under the
same adapter version, shares their blocks and starts its prefill after them (prefix caching). When a
growing sequence finds the cache full, the newest running sequence is preempted: it gives its blocks
back and is fed again, prompt and output so far, when there is room.
All torch work of the model (loading it too) runs on the engine's own thread: a second thread that
ran torch ops would bring a second OpenMP team to compete for the same cores.
"""

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from backend.config import EngineConfig
from backend.engine.block_pool import BlockPool, chain_hashes
from backend.engine.request import GenerationRequest, Limits
from backend.engine.sampling import Controls, make_generator, sample
from backend.errors import (
    RequestError,
    cancelled,
    deadline_exceeded,
    device_failed,
    engine_stopped,
    internal,
    invalid,
    unavailable,
)
from backend.lora.adapters import AdapterStore
from backend.lora.manager import AdapterManager, Want
from backend.metrics import Metrics
from backend.model.device_faults import device_lost
from backend.model.hybrid import requested_as, served_as
from backend.model.input_batch import SeqWork
from backend.model.kv_cache import parse_budget
from backend.model.runner import ModelRunner
from backend.model.warmup import warm_up
from backend.naming import check_name

log = logging.getLogger("lora_engine")


@dataclass
class Output:
    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str | None = None  # "stop" | "length"; None while more tokens follow
    error: RequestError | None = None
    adapter_version: str = ""  # content hash of the adapter version that served it ("" for the base)
    step: int = 0  # the engine step in which it was made (its last token sampled): order as the engine saw it


@dataclass(eq=False)
class Sequence:
    req: GenerationRequest
    emit: Callable[[Output], None]
    tokens: list[int]
    want: Want | None = None  # its adapter, as the folder was when it arrived
    blocks: list[int] = field(default_factory=list)  # its KV-cache blocks while it runs
    slot: int = -1  # its adapter's slot, held from admission to the end (through preemption)
    version: str = ""
    cached: int = 0  # tokens whose K/V are in its blocks
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its full blocks of tokens so far
    shared: int = 0  # its first blocks that are findable by their hashes (prefix caching)
    passed_over: bool = False  # a prompt chunk was due and not fed last step: it goes first
    out_ids: list[int] = field(default_factory=list)
    out_logprobs: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None

    def controls(self) -> Controls:
        req = self.req
        banned = req.stop_ids if len(self.out_ids) < req.min_tokens else ()
        return Controls(req.sampling, self.generator, self.tokens, self.out_ids, banned)

    def feed(self, n: int) -> SeqWork:
        """Its next n tokens for a step; it samples when they reach its last token."""
        end = self.cached + n
        return SeqWork(
            self.blocks,
            self.tokens[self.cached : end],
            self.cached,
            self.slot,
            end == len(self.tokens),
            len(self.tokens),
        )


class Engine:
    def __init__(self, cfg: EngineConfig, metrics: Metrics | None = None):
        """Loads the model on the engine thread and returns when it is ready (raises what loading raised).
        Steps run once `start` is called; until then a caller may drive `step` itself (tests)."""
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.inbox: queue.Queue[Sequence] = queue.Queue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in the order admitted
        self.stopping = threading.Event()
        self.stopped = False  # the engine thread has ended: nothing would answer
        self.fault: str | None = None  # why the device can no longer serve: the engine stops
        self.drain_by: float | None = None  # at shutdown: requests still running then end with UNAVAILABLE
        self.lock = threading.Lock()  # submit vs. the loop's decision to stop
        self.wake = threading.Event()  # a request or an adapter read arrived
        self._go = threading.Event()
        self.steps = 0  # forwards run so far
        loaded: queue.Queue[BaseException | None] = queue.Queue()
        self.thread = threading.Thread(target=self._main, args=(loaded,), name="lora-engine", daemon=True)
        self.thread.start()
        error = loaded.get()
        if error is not None:
            raise error

    def _load(self) -> None:
        cfg = self.cfg
        self.merged = cfg.merged
        if self.merged:
            check_name(self.merged)
            self.metrics.gauge("lora_adapter_merged", 1, adapter=self.merged)
        torch.set_num_threads(cfg.num_threads or len(os.sched_getaffinity(0)))
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = torch.device(device).type == "cuda"
        if on_gpu:  # Triton launches its kernels on the thread's current device, not on the tensors'
            torch.cuda.set_device(device)
        # "auto" keeps the saved dtype on a GPU; on a CPU, half precision is slow and fp32 is exact.
        dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else ("auto" if on_gpu else torch.float32)
        self.runner = ModelRunner(
            cfg.base_model,
            dtype=dtype,
            device=device,
            max_seqs=cfg.max_num_seqs,
            max_len=cfg.max_model_len,
            max_tokens=cfg.max_prefill_tokens + cfg.max_num_seqs,
            num_slots=cfg.max_loras,
            max_rank=cfg.max_lora_rank,
            targets=cfg.targets,
            lora_backend=cfg.lora_backend,
            kv_cache_memory=cfg.kv_cache_memory,
            kv_block_size=cfg.kv_block_size,
            attention_backend=cfg.attention_backend,
            merged_lora=cfg.adapter_dir / self.merged if self.merged else None,
            lean_forward=cfg.lean_forward,
            use_cuda_graphs=cfg.cuda_graphs,
        )
        self.kv = self.runner.kv
        self.blocks = BlockPool(self.kv.num_blocks, self.kv.block_size, cfg.enable_prefix_caching)
        self.warmup = warm_up(self.runner, self.runner.batch.max_tokens, cfg.max_num_seqs)
        if self.runner.graphs is not None:
            self.runner.graphs.capture()
        store = AdapterStore(
            cfg.adapter_dir,
            self.runner.shapes,
            self.runner.module_names,
            cfg.max_lora_rank,
            cfg.allow_adapter_symlinks,
            self.runner.lora.row_norms,
        )
        if self.runner.merged is not None:
            store.frozen[self.merged] = self.runner.merged
        host_budget, kind = parse_budget(cfg.host_lora_memory, "host_lora_memory")
        if kind != "bytes":
            raise ValueError(f"host_lora_memory {cfg.host_lora_memory!r}: expected bytes like 4GiB")
        self.adapters = AdapterManager(
            store, self.runner.lora, cfg.max_loras, int(host_budget), self.metrics, cfg.pinned, self.wake
        )
        eos = self.runner.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.limits = Limits(
            self.runner.vocab_size, self.runner.max_len, cfg.default_max_tokens, cfg.max_tokens_limit, tuple(eos)
        )
        self.device = device
        self.metrics.cache_config(self.kv.block_size, self.kv.num_blocks)
        self.report()

    def _main(self, loaded: queue.Queue) -> None:
        try:
            self._load()
        except BaseException as e:
            loaded.put(e)
            return
        loaded.put(None)
        self._go.wait()
        try:
            self._loop()
        except BaseException:
            log.exception("the engine thread died")
            raise
        finally:
            with self.lock:
                self.stopped = True
            while not self.inbox.empty():
                self.waiting.append(self.inbox.get_nowait())
            error = engine_stopped() if self.fault is None else device_failed(self.fault)
            for seq in [*self.running, *self.waiting]:  # none after a normal stop
                self._emit(seq, Output([], [], error=error))
            self.adapters.close()

    def start(self) -> "Engine":
        self._go.set()
        return self

    @property
    def started(self) -> bool:
        return self._go.is_set()

    @property
    def serving(self) -> bool:
        """False once the engine thread has stopped (died, or drained at shutdown) or the device is lost."""
        return not self.stopped and self.fault is None

    def submit(self, req: GenerationRequest, emit: Callable[[Output], None]) -> None:
        """Queues a request; `emit` is called from the engine thread. Raises RequestError (INVALID_ARG,
        NOT_FOUND, UNAVAILABLE) at once for what can be told without the model."""
        if not req.input_ids or req.max_tokens < 1 or len(req.input_ids) + req.max_tokens > self.limits.max_model_len:
            raise invalid(f"{len(req.input_ids)} prompt tokens + max_tokens {req.max_tokens} do not fit the context")
        name = served_as(req.lora_name, self.merged) if self.merged else req.lora_name
        want = self.adapters.want(name) if name else None
        with self.lock:
            if self.fault is not None:
                raise device_failed(self.fault)
            if self.stopping.is_set():
                raise unavailable()
            if self.stopped:
                raise engine_stopped()
            queued = self.inbox.qsize() + len(self.waiting)
            if queued >= self.cfg.max_queued_requests:
                raise unavailable(f"the engine queue is full ({queued} requests wait; max_queued_requests)")
            self.metrics.request(req.lora_name)
            self.inbox.put(Sequence(req, emit, list(req.input_ids), want))
            self.wake.set()

    def begin_shutdown(self, grace: float) -> None:
        """Stops taking requests; those still in flight after `grace` seconds end with UNAVAILABLE."""
        with self.lock:
            self.stopping.set()
            self.drain_by = time.monotonic() + grace

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stops taking requests and finishes those in flight (up to `timeout` seconds)."""
        with self.lock:
            self.stopping.set()
        self._go.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("engine did not drain within %.0f s", timeout)

    def _loop(self) -> None:
        while self.fault is None and not self._idle_until_work():
            try:
                self.wake.clear()
                if not self.step():  # everyone waits (an adapter read, a slot): until something arrives
                    self.wake.wait(0.01)
                self.report()
            except Exception as e:  # a bug must not leave requests waiting forever
                self._failed(e, [*self.running, *self.waiting])

    def report(self) -> None:
        """The occupancy and residency gauges (the loop calls it after each step)."""
        self.metrics.occupancy(
            len(self.running), self.adapters.slots_in_use, len(self.waiting), self.blocks.in_use, self.kv.num_blocks
        )
        self.metrics.prefix_cache(self.blocks.cached)
        wanted = {s.want.name for s in self.waiting if s.want and s.slot < 0}
        resident = self.adapters.resident()
        if self.merged:  # name each slot by the adapter requested, not by the mix that serves it
            wanted = {requested_as(n, self.merged) for n in wanted}
            resident = {requested_as(n, self.merged) for n in resident} | {self.merged}
        self.metrics.lora_residency(self.cfg.max_loras, resident - {""}, wanted - {""})

    def _idle_until_work(self) -> bool:
        """Waits while there is nothing to do; True once the engine should stop."""
        while not (self.running or self.waiting):
            try:
                self.metrics.flush()
            except Exception:  # metrics must not stop the serving
                log.exception("publishing metrics failed")
            try:
                self.waiting.append(self.inbox.get(timeout=0.05))
            except queue.Empty:
                with self.lock:
                    if self.stopping.is_set() and self.inbox.empty():
                        return True
        return False

    def step(self) -> bool:
        """One forward over the running batch after admitting what can join; False if there was nothing to run."""
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get_nowait())
        now = time.monotonic()
        for seq in [*self.running, *self.waiting]:
            if seq.req.is_cancelled():
                self._finish(seq, error=cancelled())
            elif self.drain_by is not None and now > self.drain_by:
                self._finish(seq, error=unavailable())
            elif seq.req.deadline is not None and now > seq.req.deadline:
                self._finish(seq, error=deadline_exceeded())
        self._admit()
        work = self._schedule()
        if not work:
            return False
        self.steps += 1
        self.metrics.step({s.req.lora_name for s, _ in work})
        fed = [s.feed(n) for s, n in work]
        sampled = [s for (s, _), w in zip(work, fed) if w.sample]  # its prompt is all in: it gets a token
        try:
            logits = self.runner.forward(self.runner.make_step(fed))
            tokens, logprobs = sample(logits, [s.controls() for s in sampled])
        except Exception as e:  # a failed step fails its requests, not the server
            self._failed(e, list(self.running))
            return True
        for seq, n in work:
            seq.cached += n
            self._share(seq)
        for seq, tok, lp in zip(sampled, tokens, logprobs):
            if tok is None:  # this sequence's logits are not finite: it alone fails
                self._finish(seq, error=internal("the model produced non-finite logits for this request"))
            else:
                self._append(seq, tok, lp)
        return True

    def _failed(self, error: Exception, failed: list[Sequence], what: str = "engine step") -> None:
        """Fails these requests; if the error lost the device (a sticky CUDA error), every request and
        the engine too: its `serving` turns false, and the server watch stops the server for a restart."""
        on_gpu = torch.device(self.device).type == "cuda"
        reason = device_lost(error, (lambda: torch.cuda.synchronize(self.device)) if on_gpu else None)
        if reason is None:
            log.exception("%s failed", what)
            for seq in failed:
                self._finish(seq, error=internal(f"{what} failed: {error}"))
            return
        log.error("the device can no longer serve (%s): every request fails, the engine stops", reason, exc_info=error)
        with self.lock:
            self.fault = reason
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, error=device_failed(reason))

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to feed) for this step. Decode tokens first, each with room for its K/V (the
        newest sequences are preempted to make it); then prompt chunks, shortest prompt first."""
        decoding = [s for s in self.running if len(s.tokens) - s.cached == 1]
        for seq in decoding:
            while seq in self.running and not self.blocks.grow(seq.blocks, len(seq.tokens)):
                self._preempt(self.running[-1])
        fed = dict.fromkeys(decoding, 1)
        budget = self.cfg.max_prefill_tokens
        prompts = [s for s in self.running if len(s.tokens) - s.cached > 1]
        for seq in prompts:
            self._catch_up(seq)
        for seq in sorted(prompts, key=lambda s: (not s.passed_over, len(s.tokens) - s.cached)):
            fed[seq] = min(len(seq.tokens) - seq.cached, budget)
            seq.passed_over = fed[seq] == 0
            budget -= fed[seq]
        return [(s, fed[s]) for s in self.running if fed.get(s)]  # in running order

    def _preempt(self, seq: Sequence) -> None:
        """Frees the sequence's blocks; it waits first in line, to be fed again from its first token. It
        keeps its adapter slot: it goes on with the weights it started with."""
        self._leave_running(seq)
        seq.cached, seq.shared, seq.passed_over = 0, 0, False
        self.waiting.appendleft(seq)
        self.metrics.inc("lora_engine_preemptions_total")
        log.info("KV cache full: request %s preempted after %d tokens", seq.req.id, len(seq.out_ids))

    def _leave_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.blocks)

    def _admit(self) -> None:
        """Waiting sequences join in arrival order while there is a running place and KV blocks for all
        their tokens so far. One whose adapter is being read or waits for a slot lets later requests
        pass: base requests, and those whose adapter sits in a slot that is not kept for it."""
        self.adapters.begin_round([s.want for s in self.waiting if s.want is not None and s.slot < 0])
        for seq in list(self.waiting):
            need = self.blocks.blocks_for(len(seq.tokens))
            if need > self.kv.num_blocks:  # cannot happen while max_model_len fits the cache: never wait forever
                self._finish(seq, error=internal(f"{len(seq.tokens)} tokens do not fit the KV cache"))
                continue
            if len(self.running) >= self.cfg.max_num_seqs or need > len(self.blocks.free):
                return
            # what can fail comes first: the sequence takes its blocks only once nothing can
            try:
                generator = seq.generator or make_generator(seq.req.sampling, self.device)
                if seq.want is not None and seq.slot < 0:
                    got = self.adapters.acquire(seq.want)
                    if got is None:
                        continue  # its adapter is being read, or it waits for a slot
                    seq.slot, seq.version = got[0], got[1].version
            except RequestError as e:
                self._finish(seq, error=e)
                continue
            except Exception as e:
                self._failed(e, [seq], "admitting the request")
                if self.fault is not None:
                    return
                continue
            self.waiting.remove(seq)
            self._take_blocks(seq)
            seq.generator = generator
            self.running.append(seq)

    def cache_key(self, seq: Sequence) -> str:
        """What computed a sequence's K/V besides its tokens: the adapter (or mix) that serves it, and its version."""
        return f"{seq.want.name}@{seq.version}" if seq.want is not None else ""

    def _take_blocks(self, seq: Sequence) -> None:
        """Its blocks for all its tokens so far: the cached ones of its longest known prefix (at least its last
        token left to compute, for its logits), then new ones. The admission checked room for all of them new."""
        if self.blocks.caching:
            bs = self.blocks.block_size
            seq.hashes = chain_hashes(seq.tokens[: len(seq.tokens) - 1], bs, self.cache_key(seq), seq.hashes)
            self.blocks.share(self.blocks.match(seq.hashes), seq.blocks)
            seq.shared = len(seq.blocks)
            seq.cached = seq.shared * bs
            self.metrics.inc("lora_engine_prefix_cache_queries_total", len(seq.tokens))
            self.metrics.inc("lora_engine_prefix_cache_hits_total", seq.cached)
        self.blocks.grow(seq.blocks, len(seq.tokens))

    def _catch_up(self, seq: Sequence) -> None:
        """A prompt still being fed takes the full blocks that sequences admitted beside it have computed
        since, in place of its own (not yet written, or written in part with the same K/V): requests that
        arrive together with one system prompt compute it about once, not once each."""
        bs = self.blocks.block_size
        if not self.blocks.caching:
            return
        found = self.blocks.match(seq.hashes)
        if len(found) * bs <= seq.cached:
            return
        self.blocks.swap(seq.blocks, seq.cached // bs, found[seq.cached // bs :])
        self.metrics.inc("lora_engine_prefix_cache_hits_total", len(found) * bs - seq.cached)
        seq.shared, seq.cached = len(found), len(found) * bs

    def _share(self, seq: Sequence) -> None:
        """Makes the blocks that the step filled findable by later sequences."""
        full = seq.cached // self.blocks.block_size
        if not self.blocks.caching or full <= seq.shared:
            return
        seq.hashes = chain_hashes(seq.tokens[: seq.cached], self.blocks.block_size, self.cache_key(seq), seq.hashes)
        for i in range(seq.shared, full):
            self.blocks.register(seq.blocks[i], seq.hashes[i])
        seq.shared = full

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        seq.tokens.append(token)
        seq.out_ids.append(token)
        seq.out_logprobs.append(logprob)
        reason = None
        if token in seq.req.stop_ids:
            reason = "stop"
        elif len(seq.out_ids) >= seq.req.max_tokens:
            reason = "length"
        if reason:
            self._finish(seq, reason)
        elif seq.req.stream:
            self._emit(seq, Output([token], [logprob]))

    def _finish(self, seq: Sequence, reason: str | None = None, error: RequestError | None = None) -> None:
        self.metrics.tokens(seq.req.lora_name, len(seq.out_ids))  # published by whoever sends the answer
        if seq in self.running:
            self._leave_running(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot >= 0:
            self.adapters.release(seq.slot)
            seq.slot = -1
        if error is not None:
            self._emit(seq, Output([], [], error=error))
        elif seq.req.stream:
            self._emit(seq, Output(seq.out_ids[-1:], seq.out_logprobs[-1:], reason))
        else:
            self._emit(seq, Output(seq.out_ids, seq.out_logprobs, reason))

    def _emit(self, seq: Sequence, out: Output) -> None:
        out.adapter_version, out.step = seq.version, self.steps
        try:
            seq.emit(out)
        except Exception:  # a response that cannot be sent must not stop the others
            log.exception("sending a response for request %s failed", seq.req.id)
