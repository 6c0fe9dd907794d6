"""The engine in-process (no tritonserver): continuous batching over the model runner and the LoRA
layers, checked token for token against PEFT's own mixed-batch generate (fp32, greedy unless said)."""

import json
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from backend.config import EngineConfig
from backend.engine.engine import Engine, Output
from backend.engine.request import GenerationRequest, SamplingParams
from backend.errors import RequestError
from demo.builders import build_adapter, build_base
from tests.conftest import ADAPTERS, peft_generate

WAIT_S = 60.0


# ---------------------------------------------------------------------------------------------- helpers


class Collector:
    """The `emit` of one request: keeps every Output; `done` is set by the final one."""

    def __init__(self):
        self.outputs: list[Output] = []
        self.done = threading.Event()

    def __call__(self, out: Output) -> None:
        self.outputs.append(out)
        if out.finish_reason is not None or out.error is not None:
            self.done.set()

    @property
    def final(self) -> Output:
        assert self.done.is_set() and self.outputs, "no final output"
        return self.outputs[-1]

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def log_probs(self) -> list[float]:
        return [p for o in self.outputs for p in o.log_probs]


def make_engine(base: Path, adapters: Path, **kw) -> Engine:
    cfg = {"device": "cpu", "dtype": "float32", "max_loras": 4, "max_num_seqs": 8, **kw}
    return Engine(EngineConfig(base_model=base, adapter_dir=adapters, **cfg))


def request(ids, adapter="", max_tokens=6, end_id: int | None = None, **kw) -> GenerationRequest:
    stop_ids = () if end_id is None else (end_id,)
    return GenerationRequest(list(ids), max_tokens=max_tokens, lora_name=adapter, stop_ids=stop_ids, **kw)


def warm(engine: Engine, *names: str) -> Engine:
    """Reads adapters into the host tier now, so that a test that counts steps need not wait for reads."""
    for name in names:
        engine.adapters.load_now(name)
    return engine


def submit_all(engine: Engine, reqs: list[GenerationRequest]) -> list[Collector]:
    collectors = [Collector() for _ in reqs]
    for req, c in zip(reqs, collectors):
        engine.submit(req, c)
    return collectors


def wait_all(engine: Engine, collectors: list[Collector], timeout: float = WAIT_S) -> None:
    """Waits for every final output; fails at once if the engine thread has died."""
    deadline = time.monotonic() + timeout
    for c in collectors:
        while not c.done.wait(0.05):
            assert engine.thread.is_alive(), "the engine thread died with requests in flight"
            assert time.monotonic() < deadline, "timed out waiting for the engine"


def run_all(engine: Engine, reqs: list[GenerationRequest]) -> list[Collector]:
    """Submits every request, then starts the engine if it is not running yet (so that requests
    submitted before the start share the first step), and waits for all of them."""
    collectors = submit_all(engine, reqs)
    if not engine.started:
        engine.start()
    wait_all(engine, collectors)
    return collectors


def warm_and_drive(engine: Engine, ps: list[list[int]], names: list[str], max_tokens: int) -> list[Collector]:
    """One request per (prompt, adapter name), the adapters read first (so that all of them join the first
    step), the engine stepped until every one has its final output."""
    warm(engine, *filter(None, names))
    collectors = submit_all(engine, [request(p, name, max_tokens) for p, name in zip(ps, names)])
    drive(engine, collectors)
    return collectors


def drive(engine: Engine, collectors: list[Collector], max_steps: int = 200) -> None:
    """Steps an engine that was not started until every request has its final output (a step that
    runs nothing, while adapters are read, does not count)."""
    deadline = time.monotonic() + WAIT_S
    while max_steps and time.monotonic() < deadline:
        if all(c.done.is_set() for c in collectors):
            return
        if engine.step():
            max_steps -= 1
        else:
            engine.wake.wait(0.01)
            engine.wake.clear()
    raise AssertionError("requests did not finish")


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, vocab) for _ in range(n - 1)] for n in lengths]


def peft_logprobs(model, ids: list[int], adapter: str, out: list[int]) -> torch.Tensor:
    """log_softmax of PEFT's logits at each generated position, for the token generated there."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + out[:-1]]), adapter_names=[adapter or "__base__"]).logits
    logprobs = torch.log_softmax(logits[0, len(ids) - 1 :].float(), -1)
    return logprobs.gather(1, torch.tensor(out)[:, None])[:, 0]


def all_blocks_free(engine: Engine) -> bool:
    return sorted(engine.blocks.free) == list(range(engine.kv.num_blocks))


def total(engine: Engine, metric: str) -> float:
    return engine.metrics.total(metric)


# ------------------------------------------------------------------------ 1. parity across architectures

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
ARCHS = {
    # name: (architecture, config overrides, adapter "a", adapter "b")
    "llama": (
        "llama",
        {},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    ),
    "llama3.2": (  # Llama-3.2-1B: llama3 rope scaling, tied embeddings, a 131,072-token context
        "llama",
        dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, max_position_embeddings=131072, head_dim=16),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        dict(r=8, lora_alpha=16, target_modules="all-linear"),
    ),
    "mistral": (
        "mistral",
        {"sliding_window": 8},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    ),
    "qwen2": (  # layer 0 full attention, layer 1 a sliding window of 8
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=8, lora_alpha=32, target_modules="all-linear", rank_pattern={"down_proj": 2}),
    ),
    "qwen2.5": (  # Qwen2.5-0.5B: q/k/v biases, tied embeddings, 14:2 heads (here 6:2)
        "qwen2",
        dict(tie_word_embeddings=True, hidden_size=96, num_attention_heads=6, num_key_value_heads=2),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
        dict(r=8, lora_alpha=16, target_modules="all-linear"),
    ),
    "phi3": (  # Phi-3-mini: fused qkv_proj and gate_up_proj, head_dim 96 (here 24: not a power of two)
        "phi3",
        dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=4, sliding_window=8),
        dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"]),
        dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "gate_up_proj", "down_proj"]),
    ),
    "gemma2": (  # Gemma-2: attention and final logit soft-capping, sliding and full layers alternating
        "gemma2",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=1.0,  # small enough to bite on random weights
            final_logit_softcapping=30.0,
            sliding_window=8,
            num_hidden_layers=4,
            tie_word_embeddings=True,
            initializer_range=0.05,
        ),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=8, lora_alpha=16, target_modules="all-linear"),
    ),
    "gpt2": (  # Conv1D layers: PEFT needs fan_in_fan_out
        "gpt2",
        {},
        dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
}
ARCH_VOCAB = 256


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_assets(request, tmp_path_factory):
    """(root, PeftModel with adapters "a" and "b") for one architecture."""
    name = request.param
    arch, overrides, lora_a, lora_b = ARCHS[name]
    root = tmp_path_factory.mktemp(name)
    base = build_base(root / "base", arch=arch, vocab_size=ARCH_VOCAB, **overrides)
    if arch == "qwen2":  # q/k/v have a bias: make it non-zero so that it counts
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                    p.normal_(0, 0.5)
        model.save_pretrained(base)
    build_adapter(base, root / "adapters" / "a", seed=11, **lora_a)
    build_adapter(base, root / "adapters" / "b", seed=12, **lora_b)
    # eager: transformers' plain attention, the one that applies every argument (soft-capping too)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    if "sliding_window" in overrides or name == "qwen2":
        assert model.config.sliding_window == 8
    model = PeftModel.from_pretrained(model, root / "adapters" / "a", adapter_name="a")
    model.load_adapter(root / "adapters" / "b", adapter_name="b")
    return root, model.eval()


def test_mixed_batch_matches_peft_per_architecture(arch_assets):
    """Base + two adapters (different ranks and targets) in one batch, prompts of 1..20 tokens
    (longer than the sliding windows), fed in chunks of at most 8 tokens, K/V in blocks of 4 tokens:
    each output equals PEFT's."""
    root, model = arch_assets
    ps = prompts(ARCH_VOCAB, [3, 13, 20, 1], seed=3)
    cases = [(n, p) for p in ps[:3] for n in ["", "a", "b"]] + [("b", ps[3])]
    engine = make_engine(
        root / "base", root / "adapters", max_num_seqs=len(cases), max_prefill_tokens=8, kv_block_size=4
    )
    warm(engine, "a", "b")  # read first: all three run from the first step
    try:
        outs = run_all(engine, [request(p, n, max_tokens=6) for n, p in cases])
    finally:
        engine.shutdown()
    refs = [peft_generate(model, p, n, 6) for n, p in cases]
    for (n, p), out, ref in zip(cases, outs, refs):
        assert out.final.error is None, out.final.error
        assert out.final.token_ids == ref, (n, len(p))
        assert out.final.finish_reason == "length"
    # the adapters change the output (else the comparison proves little) ...
    assert len({tuple(r) for r in refs[6:9]}) == 3
    if model.config.model_type == "gemma2":  # ... and so does soft-capping
        with torch.no_grad(), model.disable_adapter():
            logits = model(torch.tensor([ps[2]])).logits
            for m in model.modules():
                if hasattr(m, "attn_logit_softcapping"):
                    m.attn_logit_softcapping = None
            assert not torch.allclose(logits, model(torch.tensor([ps[2]])).logits, atol=1e-2)
    # ... and all three (base, a, b) ran in the same steps
    assert engine.metrics.get("lora_engine_max_adapters_per_step") == 3


@pytest.mark.parametrize("chunk", [2048, 3])
def test_lora_on_output_layer_matches_peft(assets, vocab, tmp_path, chunk):
    """With lm_head among the server's LoRA targets, an adapter on lm_head (which sees only each
    sequence's last token) matches PEFT in a batch that mixes prefill and decode; with prompts fed 3
    tokens per step, some steps sample no sequence at all."""
    adapters = tmp_path / "adapters"
    torch.manual_seed(31)
    base = AutoModelForCausalLM.from_pretrained(assets / "base", dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    # PEFT saves lm_head's base weight too by default ("embedding layer"): the store refuses that
    get_peft_model(base, lora).save_pretrained(adapters / "head", save_embedding_layers=False)
    shutil.copytree(assets / "adapters" / "qv-r4", adapters / "qv-r4")
    model = AutoModelForCausalLM.from_pretrained(assets / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters / "head", adapter_name="head")
    model.load_adapter(adapters / "qv-r4", adapter_name="qv-r4")
    model.eval()
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"
    engine = make_engine(assets / "base", adapters, lora_target_modules=targets, max_prefill_tokens=chunk)
    assert "lm_head" in engine.runner.lora.layers
    ps = prompts(vocab, [4, 11, 7, 2], seed=37)
    cases = [("head", ps[0]), ("", ps[1]), ("qv-r4", ps[2]), ("head", ps[3])]
    outs = submit_all(engine, [request(p, n, 5) for n, p in cases[:2]])
    engine.step()  # the later two join while the first two decode
    outs += submit_all(engine, [request(p, n, 5) for n, p in cases[2:]])
    drive(engine, outs)
    refs = [peft_generate(model, p, n, 5) for n, p in cases]
    assert [o.final.error for o in outs] == [None] * 4
    assert [o.final.token_ids for o in outs] == refs
    assert refs[0] != peft_generate(model, ps[0], "", 5)


def test_model_loads_and_steps_on_the_engine_thread(assets, monkeypatch):
    """All torch work of the model runs on one thread (one OpenMP team), with the configured thread count."""
    import backend.engine.engine

    seen = []

    class Runner(backend.engine.engine.ModelRunner):
        def __init__(self, *a, **kw):
            seen.append(("load", threading.current_thread().name, torch.get_num_threads()))
            super().__init__(*a, **kw)

        def forward(self, step):
            seen.append(("step", threading.current_thread().name, torch.get_num_threads()))
            return super().forward(step)

    monkeypatch.setattr(backend.engine.engine, "ModelRunner", Runner)
    engine = make_engine(assets / "base", assets / "adapters", num_threads=1).start()
    try:
        run_all(engine, [request([1, 5, 6], "qv-r4", max_tokens=2)])
    finally:
        engine.shutdown()
    assert seen[0] == ("load", "lora-engine", 1)
    assert set(seen[1:]) == {("step", "lora-engine", 1)} and len(seen) == 4  # the probe at load, 2 steps


# --------------------------------------------------------------------------------- 2. continuous batching


def test_requests_join_and_leave_between_steps(assets, peft_model, vocab):
    engine = make_engine(assets / "base", assets / "adapters", max_num_seqs=4)
    seen: list[list[int]] = []  # tokens fed per sequence, per forward
    forward = engine.runner.forward

    def spy(batch):
        seen.append([n for _, n, _ in batch.spans])
        return forward(batch)

    engine.runner.forward = spy
    warm(engine, "qv-r4", "all-r16-pattern", "mlp-r64")
    p = prompts(vocab, [7, 11, 13, 4], seed=5)
    first = [request(p[0], "", 8), request(p[1], "qv-r4", 5)]
    late = [request(p[2], "all-r16-pattern", 6), request(p[3], "mlp-r64", 3)]
    c_first = submit_all(engine, first)
    for _ in range(3):
        engine.step()
    assert len(engine.running) == 2 and seen[-1] == [1, 1]  # both decoding
    c_late = submit_all(engine, late)
    engine.step()
    assert len(engine.running) == 4
    assert seen[-1] == [1, 1, 13, 4]  # one forward: two decode tokens and two prompts

    collectors = c_first + c_late
    seqs = {id(s.emit): s for s in engine.running}
    counts = [len(engine.running)]
    while not all(c.done.is_set() for c in collectors):
        engine.step()
        counts.append(len(engine.running))
        for c in collectors:
            seq = seqs[id(c)]
            if c.done.is_set():  # a finished sequence has left and given its blocks and slot back
                assert seq not in engine.running and not seq.blocks
            else:
                assert seq in engine.running and seq.blocks
        held = sum(len(s.blocks) for s in engine.running)
        assert held + len(engine.blocks.free) == engine.kv.num_blocks
    assert counts[0] == 4 and counts == sorted(counts, reverse=True) and counts[-1] == 0
    assert len(set(counts)) >= 3  # they left at different steps
    assert all_blocks_free(engine) and not engine.waiting
    assert all(s.refs == 0 for s in engine.adapters.slots)
    for req, c in zip(first + late, collectors):
        assert c.final.token_ids == peft_generate(peft_model, req.input_ids, req.lora_name, req.max_tokens)
        assert c.final.finish_reason == "length"


# ------------------------------------------------------------------------- 3. more adapters than slots


def test_more_adapters_than_slots(assets, peft_model, vocab, engines):
    """max_loras=2, max_num_seqs=3, four adapters (two requests each) and the base at once: all
    finish, all equal PEFT, slots were reused by eviction, and every forward ran each sequence with
    its own adapter's weights in its slot."""
    engine = make_engine(assets / "base", assets / "adapters", max_loras=2, max_num_seqs=3)
    violations, checked = [], []
    forward = engine.runner.forward

    def check(batch):
        tokens = batch.lora.tokens
        token_slots = tokens.seg.token_slots.tolist() if tokens else [-1] * len(batch.input_ids)
        for seq, (start, n, _) in zip(engine.running, batch.spans):
            name = seq.req.lora_name
            if set(token_slots[start : start + n]) != {seq.slot}:
                violations.append(f"tokens of a {name or 'base'} request not mapped to its slot {seq.slot}")
            if not name:
                continue
            table = engine.adapters.by_name.get(name)
            if table is None or table.index != seq.slot:
                violations.append(f"{name} runs in slot {seq.slot}, table says {table and table.index}")
                continue
            adapter = table.adapter
            for module, layer in engine.runner.lora.layers.items():
                m = adapter.modules.get(module)
                r = m.rank if m else 0
                w, sl = layer.w, layer.slice  # a q/k/v or gate/up layer is a slice of its group's slots
                cols = slice(w.starts[sl], w.starts[sl] + w.widths[sl])
                if w.ranks[sl][seq.slot] != r or (
                    m
                    and not (
                        torch.equal(w.a[sl, seq.slot, :r], m.a)
                        and torch.equal(w.b[seq.slot, cols, :r], m.b)
                        and w.scales[sl][seq.slot] == m.scale
                    )
                ):
                    violations.append(f"{name} in slot {seq.slot}: wrong weights at {module}")
            checked.append(name)
        return forward(batch)

    engine.runner.forward = check
    engines.append(engine)
    names = list(ADAPTERS)
    ps = prompts(vocab, [5, 9, 3, 12, 7, 4, 10, 6, 8], seed=7)
    cases = [(names[i % 4], p) for i, p in enumerate(ps[:8])] + [("", ps[8])]
    outs = run_all(engine, [request(p, n, max_tokens=4) for n, p in cases])
    assert not violations, violations[:5]
    assert set(checked) == set(names)
    for (n, p), out in zip(cases, outs):
        assert out.final.error is None, out.final.error
        assert out.final.token_ids == peft_generate(peft_model, p, n, 4), n
    assert total(engine, "lora_adapter_evictions_total") > 0
    assert total(engine, "lora_cache_misses_total") >= 4
    assert all(s.refs == 0 for s in engine.adapters.slots)
    assert all_blocks_free(engine)


# ------------------------------------------------------------------------------ 4. end_id and log-probs


def test_end_id_and_log_probs(assets, peft_model, vocab, engines):
    p = prompts(vocab, [9, 5], seed=9)
    ref = peft_generate(peft_model, p[0], "qv-r4", 8)
    k = next(i for i in range(2, 8) if ref[i] not in ref[:i])
    never = next(t for t in range(4, vocab) if t not in ref)
    reqs = [
        request(p[0], "qv-r4", 8, end_id=ref[k]),  # stops at step k, end token included
        request(p[0], "qv-r4", 8, end_id=ref[0]),  # stops at once
        request(p[0], "qv-r4", 8),  # no end_id
        request(p[0], "qv-r4", 8, end_id=never),
        request(p[1], "all-r16-pattern", 7),
        request(p[1], "", 7),
        request(p[1], "mlp-r64", 7, end_id=never),
    ]
    engine = make_engine(assets / "base", assets / "adapters")
    engines.append(engine)
    outs = run_all(engine, reqs)
    assert outs[0].final.token_ids == ref[: k + 1] == peft_generate(peft_model, p[0], "qv-r4", 8, end_id=ref[k])
    assert outs[0].final.finish_reason == "stop"
    assert outs[1].final.token_ids == ref[:1] and outs[1].final.finish_reason == "stop"
    for out, req in zip(outs[2:], reqs[2:]):
        assert out.final.finish_reason == "length"
        assert len(out.final.token_ids) == req.max_tokens
        assert out.final.token_ids == peft_generate(peft_model, req.input_ids, req.lora_name, req.max_tokens)
    for out, req in zip(outs, reqs):
        got = out.final
        assert len(got.log_probs) == len(got.token_ids)
        expected = peft_logprobs(peft_model, req.input_ids, req.lora_name, got.token_ids)
        torch.testing.assert_close(torch.tensor(got.log_probs), expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- 5. sampling


def test_seeded_sampling(assets, peft_model, vocab, engines):
    p = prompts(vocab, [6, 14, 3, 9], seed=11)
    hot = SamplingParams(temperature=1.5, seed=1234)

    def seeded(sampling=hot):
        return request(p[0], "all-r16-pattern", 10, sampling=sampling)

    engine = make_engine(assets / "base", assets / "adapters")
    engines.append(engine)
    (alone,) = run_all(engine, [seeded()])
    others = [
        request(p[1], "", 10),
        seeded(),
        request(p[2], "qv-r4", 10, sampling=SamplingParams(temperature=1.0)),  # unseeded
        seeded(SamplingParams(temperature=1.5, seed=99)),
        request(p[3], "mlp-r64", 10, sampling=SamplingParams(temperature=0.7, top_k=1, seed=5)),
        request(p[3], "mlp-r64", 10, sampling=SamplingParams(temperature=0.7, top_p=1e-6, seed=6)),
        seeded(),
        request(p[3], "mlp-r64", 10),
    ]
    outs = run_all(engine, others)
    tokens = [o.final.token_ids for o in outs]
    # same seed, same tokens, whatever else shares the batch
    assert tokens[1] == tokens[6] == alone.final.token_ids
    # a different seed gives different tokens
    assert tokens[3] != tokens[1]
    # top_k=1 and a tiny top_p are greedy
    greedy = peft_generate(peft_model, p[3], "mlp-r64", 10)
    assert tokens[4] == tokens[5] == tokens[7] == greedy
    assert all(len(t) == 10 for t in tokens)
    # sampling really samples (else the seed checks say little): not the greedy tokens
    assert tokens[1] != peft_generate(peft_model, p[0], "all-r16-pattern", 10)


# ------------------------------------------------------------------------------------------ 6. streaming


def test_streaming_one_output_per_token(assets, peft_model, vocab, engines):
    p = prompts(vocab, [8, 4], seed=13)
    ref = peft_generate(peft_model, p[1], "attn-r8-rslora", 8)
    end = next(t for i, t in enumerate(ref) if i >= 2 and t not in ref[:i])
    pairs = [
        dict(ids=p[0], adapter="qv-r4", max_tokens=6),
        dict(ids=p[1], adapter="attn-r8-rslora", max_tokens=8, end_id=end),
        dict(ids=p[1], adapter="", max_tokens=1),
    ]
    reqs = [request(stream=s, **kw) for kw in pairs for s in (True, False)]
    engine = make_engine(assets / "base", assets / "adapters")
    engines.append(engine)
    outs = run_all(engine, reqs)
    for i in range(0, len(reqs), 2):
        streamed, unary = outs[i], outs[i + 1]
        assert len(unary.outputs) == 1
        assert len(streamed.outputs) == len(unary.final.token_ids)
        assert all(len(o.token_ids) == len(o.log_probs) == 1 and o.error is None for o in streamed.outputs)
        assert [o.finish_reason for o in streamed.outputs[:-1]] == [None] * (len(streamed.outputs) - 1)
        assert streamed.final.finish_reason == unary.final.finish_reason
        assert streamed.token_ids == unary.final.token_ids
        assert streamed.log_probs == pytest.approx(unary.final.log_probs, abs=1e-5)
    assert outs[2].final.finish_reason == "stop" and outs[2].token_ids[-1] == end
    assert outs[0].token_ids == peft_generate(peft_model, p[0], "qv-r4", 6)


# --------------------------------------------------------------------------------------------- 7. errors


def test_unknown_adapter_fails_at_submit(assets):
    engine = make_engine(assets / "base", assets / "adapters")
    c = Collector()
    with pytest.raises(RequestError) as e:
        engine.submit(request([1, 5, 6], "no-such-adapter"), c)
    assert e.value.code == "NOT_FOUND" and str(e.value) == "LoRA adapter 'no-such-adapter' not found"
    for bad in ["../qv-r4", "/etc", ".hidden"]:
        with pytest.raises(RequestError) as e:
            engine.submit(request([1, 5, 6], bad), c)
        assert e.value.code == "INVALID_ARG", bad
    assert engine.inbox.empty() and not c.outputs


@pytest.fixture
def error_dir(assets, tmp_path) -> Path:
    """Adapters: qv-r4 and all-r16-pattern (copies), dora (qv-r4 with use_dora set, but no magnitudes)."""
    root = tmp_path / "adapters"
    for name in ["qv-r4", "all-r16-pattern"]:
        shutil.copytree(assets / "adapters" / name, root / name)
    shutil.copytree(assets / "adapters" / "qv-r4", root / "dora")
    cfg = json.loads((root / "dora" / "adapter_config.json").read_text())
    (root / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    return root


def test_invalid_adapter_fails_at_admission_alone(assets, peft_model, vocab, error_dir):
    """max_lora_rank=8: all-r16-pattern (rank 16) and dora are refused once their reads end, through
    emit; the valid requests beside them run meanwhile and never see it."""
    engine = make_engine(assets / "base", error_dir, max_lora_rank=8)
    p = prompts(vocab, [5, 8, 6, 7], seed=17)
    reqs = [
        request(p[0], "qv-r4"),
        request(p[1], "all-r16-pattern"),
        request(p[2], ""),
        request(p[3], "dora"),
    ]
    outs = submit_all(engine, reqs)  # submit() does not read adapters: no error yet
    drive(engine, outs)
    for i in (1, 3):
        err = outs[i].final.error
        assert err is not None and err.code == "INVALID_ARG" and outs[i].final.token_ids == []
    assert "'all-r16-pattern'" in outs[1].final.error.message and "rank 16" in outs[1].final.error.message
    assert "'dora'" in outs[3].final.error.message and "DoRA" in outs[3].final.error.message
    for i in (0, 2):
        assert outs[i].final.error is None
        assert outs[i].final.token_ids == peft_generate(peft_model, reqs[i].input_ids, reqs[i].lora_name, 6)
    assert total(engine, "lora_adapter_load_failures_total") == 2
    assert all(s.refs == 0 for s in engine.adapters.slots) and "dora" not in engine.adapters.by_name


@pytest.mark.parametrize("damage", ["corrupt-weights", "config-not-an-object", "alpha-not-a-number"])
def test_unreadable_adapter_fails_alone_and_engine_goes_on(assets, peft_model, vocab, error_dir, damage, engines):
    """An adapter folder whose files cannot be used (garbage safetensors, a config that is not a
    JSON object or has a string lora_alpha) is that request's INVALID_ARG error; the engine thread
    survives and the other requests complete."""
    bad = error_dir / "broken"
    shutil.copytree(error_dir / "qv-r4", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    if damage == "corrupt-weights":
        (bad / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    elif damage == "config-not-an-object":
        (bad / "adapter_config.json").write_text("[]")
    else:
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": "8"}))
    engine = make_engine(assets / "base", error_dir)
    engines.append(engine)
    p = prompts(vocab, [5, 6], seed=19)
    reqs = [request(p[0], "qv-r4"), request(p[1], "broken"), request(p[1], "")]
    outs = run_all(engine, reqs)
    assert outs[1].final.error is not None and outs[1].final.error.code == "INVALID_ARG"
    assert "'broken'" in outs[1].final.error.message
    for i in (0, 2):
        assert outs[i].final.token_ids == peft_generate(peft_model, reqs[i].input_ids, reqs[i].lora_name, 6)
    (after,) = run_all(engine, [request(p[0], "qv-r4")])  # and it keeps serving
    assert after.final.token_ids == outs[0].final.token_ids


def test_cancellation_frees_blocks_and_slot(assets, peft_model, vocab):
    engine = warm(make_engine(assets / "base", assets / "adapters", max_num_seqs=3), "qv-r4", "mlp-r64")
    p = prompts(vocab, [6, 9], seed=23)
    cancel = threading.Event()
    reqs = [
        request(p[0], "qv-r4", 20, is_cancelled=cancel.is_set, stream=True),
        request(p[1], "mlp-r64", 6),
        request(p[1], "qv-r4", 6, is_cancelled=lambda: True),  # cancelled before it is admitted
    ]
    outs = submit_all(engine, reqs)
    for _ in range(3):
        engine.step()
    assert outs[2].final.error.code == "CANCELLED" and outs[2].final.token_ids == []
    (victim,) = [s for s in engine.running if s.emit is outs[0]]
    blocks, slot = list(victim.blocks), victim.slot
    assert blocks and not set(blocks) & set(engine.blocks.free)
    assert engine.adapters.slots[slot].refs == 1 and len(outs[0].outputs) == 3
    cancel.set()
    engine.step()
    assert outs[0].final.error is not None and outs[0].final.error.code == "CANCELLED"
    assert outs[0].final.token_ids == [] and len(outs[0].outputs) == 4
    assert (
        victim not in engine.running
        and set(blocks) <= set(engine.blocks.free)
        and engine.adapters.slots[slot].refs == 0
    )
    assert len(engine.running) == 1 and not outs[1].done.is_set()
    drive(engine, outs)
    assert outs[1].final.token_ids == peft_generate(peft_model, p[1], "mlp-r64", 6)
    assert all_blocks_free(engine) and all(s.refs == 0 for s in engine.adapters.slots)


# ------------------------------------------------------------------------------------------- 8. shutdown


def test_shutdown_drains_requests_in_flight(assets, peft_model, vocab):
    engine = make_engine(assets / "base", assets / "adapters").start()
    names = ["", *ADAPTERS]
    ps = prompts(vocab, [4, 7, 10, 5, 8, 3], seed=29)
    reqs = [request(p, names[i % len(names)], 8, stream=(i == 0)) for i, p in enumerate(ps)]
    outs = submit_all(engine, reqs)
    assert outs[0].done.wait(0) is False
    deadline = time.monotonic() + WAIT_S
    while not outs[0].outputs:  # the first token is out: the batch is mid-generation
        assert time.monotonic() < deadline
        time.sleep(0.005)
    engine.shutdown()
    assert not engine.thread.is_alive()
    for req, out in zip(reqs, outs):
        assert out.done.is_set() and out.final.error is None and out.final.finish_reason == "length"
        assert out.token_ids == peft_generate(peft_model, req.input_ids, req.lora_name, 8)
    with pytest.raises(RequestError) as e:
        engine.submit(request(ps[0]), Collector())
    assert e.value.code == "UNAVAILABLE"


def test_submit_racing_shutdown_is_answered(assets):
    """Requests submitted while shutdown() runs: each is refused with UNAVAILABLE or answered,
    never left without a reply."""
    engine = make_engine(assets / "base", assets / "adapters").start()
    accepted, refused = [], []
    first = threading.Event()

    def submitter():
        for _ in range(30):
            c = Collector()
            try:
                engine.submit(request([1, 5, 6], "", 2), c)
                accepted.append(c)
                first.set()
            except RequestError as e:
                assert e.code == "UNAVAILABLE"
                refused.append(e)

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for t in threads:
        t.start()
    first.wait(10.0)
    engine.shutdown()
    for t in threads:
        t.join()
    assert accepted and len(accepted) + len(refused) == 120
    assert all(c.done.wait(10.0) for c in accepted), "an accepted request was never answered"


def test_decode_step_launches_at_most_two_kernels_per_module(assets):
    """Single-token decode with one all-linear adapter, lora_backend=triton: one shrink and one
    expand per lone layer and per fused group (q/k/v, gate/up), so at most two per module."""
    engine = warm(make_engine(assets / "base", assets / "adapters", lora_backend="triton"), "all-r16-pattern")
    ops = engine.runner.lora.ops
    launches = []
    shrink, expand = ops.shrink, ops.expand
    ops.shrink = lambda *a, **k: launches.append("shrink") or shrink(*a, **k)
    ops.expand = lambda *a, **k: launches.append("expand") or expand(*a, **k)
    c = Collector()
    engine.submit(request([1, 5, 6, 7], "all-r16-pattern", max_tokens=3), c)
    engine.step()  # prefill
    launches.clear()
    engine.step()  # one decode token
    layers = engine.runner.lora.layers
    groups = {id(m.group) for m in layers.values() if m.group is not None}
    units = len(groups) + sum(m.group is None for m in layers.values())
    assert groups and launches.count("shrink") == launches.count("expand") == units
    assert len(launches) <= 2 * len(layers)
    num_layers = engine.runner.config.num_hidden_layers
    assert len(launches) == 8 * num_layers  # q/k/v, o, gate/up, down: 4 units of 2 launches per layer


# -------------------------------------------------------------------------------------- 9. fault domains


class Failing:
    """Raises on its first `times` calls, then calls `real`."""

    def __init__(self, real, times: int = 1):
        self.real, self.left = real, times

    def __call__(self, *args, **kw):
        if self.left:
            self.left -= 1
            raise RuntimeError("injected failure")
        return self.real(*args, **kw)


class FlakyCollector(Collector):
    """An emit whose first call raises (a response that cannot be sent)."""

    def __init__(self):
        super().__init__()
        self.failed = False

    def __call__(self, out: Output) -> None:
        super().__call__(out)
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected send failure")


@pytest.mark.parametrize("stage", ["admit", "forward", "sample", "emit"])
def test_injected_failures_leave_no_leak(assets, peft_model, vocab, monkeypatch, stage):
    """A failure at admission, in the forward, in sampling or in emitting fails at most the requests of
    that step (INTERNAL); every request gets a final output, rows and slots all return to free, and
    the requests after it are served as before."""
    import backend.engine.engine as engine_module

    engine = warm(make_engine(assets / "base", assets / "adapters", max_num_seqs=4), "qv-r4", "mlp-r64")
    if stage == "admit":
        monkeypatch.setattr(engine_module, "make_generator", Failing(engine_module.make_generator))
    elif stage == "forward":
        monkeypatch.setattr(engine.runner, "forward", Failing(engine.runner.forward))
    elif stage == "sample":
        monkeypatch.setattr(engine_module, "sample", Failing(engine_module.sample))
    p = prompts(vocab, [5, 7, 6, 4, 8, 5], seed=31)
    names = ["qv-r4", "", "mlp-r64", "qv-r4", "all-r16-pattern", ""]
    reqs = [request(ids, name, 5, stream=(i % 2 == 0)) for i, (ids, name) in enumerate(zip(p, names))]
    outs = [FlakyCollector() if stage == "emit" and i == 0 else Collector() for i in range(len(reqs))]
    for req, c in zip(reqs, outs):
        engine.submit(req, c)
    drive(engine, outs)
    failed = [c for c in outs if c.final.error is not None]
    assert all(c.final.error.code == "INTERNAL" for c in failed)
    assert len(failed) == {"admit": 1, "forward": 4, "sample": 4, "emit": 0}[stage]
    for req, c in zip(reqs, outs):
        if c.final.error is None:
            assert c.token_ids == peft_generate(peft_model, req.input_ids, req.lora_name, 5)
    assert all_blocks_free(engine) and not engine.running and not engine.waiting
    assert all(s.refs == 0 for s in engine.adapters.slots)
    (after,) = run_all(engine, [request(p[0], "qv-r4", 5)])
    assert after.final.token_ids == peft_generate(peft_model, p[0], "qv-r4", 5)


def test_non_finite_logits_fail_only_their_sequence(assets, peft_model, vocab, monkeypatch):
    engine = warm(make_engine(assets / "base", assets / "adapters"), "qv-r4", "mlp-r64")
    forward = engine.runner.forward

    def poisoned(batch):
        logits = forward(batch).clone()
        logits[1] = float("nan")  # the second running sequence
        return logits

    monkeypatch.setattr(engine.runner, "forward", poisoned)
    p = prompts(vocab, [5, 6, 7], seed=37)
    outs = submit_all(engine, [request(p[0], "qv-r4", 1), request(p[1], "", 1), request(p[2], "mlp-r64", 1)])
    drive(engine, outs)
    assert outs[1].final.error.code == "INTERNAL" and "non-finite" in outs[1].final.error.message
    assert outs[0].final.token_ids == peft_generate(peft_model, p[0], "qv-r4", 1)
    assert outs[2].final.token_ids == peft_generate(peft_model, p[2], "mlp-r64", 1)
    assert all_blocks_free(engine) and all(s.refs == 0 for s in engine.adapters.slots)


def test_bounded_queue_and_deadline(assets):
    engine = make_engine(assets / "base", assets / "adapters", max_queued_requests=2)
    outs = submit_all(engine, [request([1, 5, 6]), request([1, 7, 8], deadline=time.monotonic() - 1)])
    with pytest.raises(RequestError) as e:
        engine.submit(request([1, 9]), Collector())
    assert e.value.code == "UNAVAILABLE" and "queue is full" in e.value.message
    drive(engine, outs)
    assert outs[0].final.error is None
    assert outs[1].final.error.code == "UNAVAILABLE" and "timeout expired" in outs[1].final.error.message


def test_a_dead_engine_thread_answers_and_refuses(assets, monkeypatch):
    """If the engine thread dies, requests in flight get UNAVAILABLE and new ones are refused at once."""
    engine = make_engine(assets / "base", assets / "adapters")
    gate = threading.Event()

    def die(*_):
        gate.wait(WAIT_S)
        raise SystemExit("injected")  # not an Exception: escapes the step's error handling

    monkeypatch.setattr(engine, "step", die)
    c = Collector()
    engine.submit(request([1, 5, 6]), c)
    engine.start()
    gate.set()
    assert c.done.wait(WAIT_S) and c.final.error.code == "UNAVAILABLE"
    engine.thread.join(WAIT_S)
    assert not engine.serving
    with pytest.raises(RequestError) as e:
        engine.submit(request([1, 5, 6]), Collector())
    assert e.value.code == "UNAVAILABLE"
