"""The paged KV cache and the scheduling over it, in-process: a cache sized by a budget and refused at load
when one full-length sequence does not fit, chunked prefill that lets a short prompt pass a long one,
preemption when the cache is full (outputs still PEFT's), and the attention arguments we refuse."""

import pytest
import torch
from transformers import AttentionInterface

from backend.config import EngineConfig
from backend.engine.request import SamplingParams
from backend.model import attention
from backend.model import runner as model_runner
from backend.model.attention import AttnArgs, UnsupportedAttention, attend
from backend.model.kv_cache import LayerShape, parse_budget, plan_cache
from tests.conftest import peft_generate
from tests.test_engine import Collector, all_blocks_free, drive, make_engine, prompts, request, run_all, total, warm

# the test assets' base: 2 layers x K and V x 2 kv heads x head_dim 16 x fp32
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4


def test_budget_settings():
    assert parse_budget("auto") == (0.0, "auto")
    assert parse_budget("0.5") == (0.5, "fraction")
    assert parse_budget("4GiB") == (4 * 2**30, "bytes")
    assert parse_budget("512 MB") == (512e6, "bytes")
    assert parse_budget("2e9") == (2e9, "bytes")
    for bad in ["", "-1", "lots", "4 parsecs", "0"]:
        with pytest.raises(ValueError, match="kv_cache_memory"):
            parse_budget(bad)


def test_plan_holds_the_budget_and_no_more_than_needed():
    layers = [LayerShape(2, 16)] * 2
    plan = plan_cache(layers, torch.float32, 10**6, 16, max_len=256, max_seqs=100)
    assert plan.bytes_per_token == BYTES_PER_TOKEN and plan.nbytes <= 10**6 < plan.nbytes + 16 * BYTES_PER_TOKEN
    assert plan_cache(layers, torch.float32, 10**9, 16, max_len=256, max_seqs=3).num_blocks == 3 * 16
    with pytest.raises(ValueError) as e:
        plan_cache(layers, torch.float32, 64 * 2**10, 16, max_len=256, max_seqs=1)
    assert str(e.value) == (
        "the KV cache budget 64.0 KiB (65536 bytes) holds 128 tokens at 512 bytes per token; one sequence of "
        "max_model_len 256 needs 128.0 KiB. Raise kv_cache_memory or lower max_model_len."
    )


def test_a_budget_short_of_one_sequence_fails_the_load(assets):
    with pytest.raises(ValueError, match=r"holds 128 tokens at 512 bytes per token; one sequence of max_model_len 256"):
        make_engine(assets / "base", assets / "adapters", kv_cache_memory="64KiB")
    engine = make_engine(assets / "base", assets / "adapters", kv_cache_memory="64KiB", max_model_len=128)
    assert engine.kv.num_blocks == 8 and engine.limits.max_model_len == 128
    engine.shutdown()


def test_the_cache_is_allocated_at_load_and_sized_by_the_budget(assets):
    engine = make_engine(assets / "base", assets / "adapters", kv_cache_memory="200KiB", max_num_seqs=32)
    try:
        assert engine.kv.num_blocks == 200 * 2**10 // (16 * BYTES_PER_TOKEN)
        assert sum(k.nbytes + v.nbytes for k, v in zip(engine.kv.k, engine.kv.v)) == engine.kv.plan.nbytes
    finally:
        engine.shutdown()
    # a budget larger than max_num_seqs full-length sequences need is not spent
    engine = make_engine(assets / "base", assets / "adapters", kv_cache_memory="1GiB", max_num_seqs=2)
    assert engine.kv.num_blocks == 2 * 256 // 16
    engine.shutdown()


def test_a_short_prompt_passes_a_long_one(assets, peft_model, vocab):
    """max_prefill_tokens 16: a 200-token prompt is fed over 13 steps; a 5-token prompt that arrives
    after the first chunk gets its first token in the next step, and the long one's decoding goes on."""
    engine = warm(make_engine(assets / "base", assets / "adapters", max_prefill_tokens=16), "qv-r4", "mlp-r64")
    long_p, short_p = prompts(vocab, [200, 5], seed=41)
    fed: list[list[int]] = []
    make_step = engine.runner.make_step
    engine.runner.make_step = lambda work: fed.append([len(w.tokens) for w in work]) or make_step(work)
    long_out, short_out = Collector(), Collector()
    engine.submit(request(long_p, "qv-r4", 4, stream=True), long_out)
    engine.step()
    engine.submit(request(short_p, "mlp-r64", 3, stream=True), short_out)
    engine.step()
    assert fed == [[16], [11, 5]] and short_out.outputs and not long_out.outputs  # the short one first
    drive(engine, [long_out, short_out])
    assert [f[0] for f in fed] == [16, 11] + [16] * 10 + [13] + [1] * 3  # 13 chunks, then 3 decode steps
    assert [len(f) for f in fed[1:5]] == [2, 2, 2, 1]  # the short one decoded beside the chunks
    assert long_out.token_ids == peft_generate(peft_model, long_p, "qv-r4", 4)
    assert short_out.token_ids == peft_generate(peft_model, short_p, "mlp-r64", 3)
    assert all_blocks_free(engine)


def test_a_full_cache_preempts_and_outputs_stay_exact(assets, peft_model, vocab):
    """A cache of 20 blocks (320 tokens) and four requests that grow to 100 tokens each: the newest
    are preempted and fed again; greedy outputs equal PEFT's, a seeded sample equals itself alone."""
    p = prompts(vocab, [40, 41, 39, 42], seed=43)
    hot = SamplingParams(temperature=1.3, seed=99)
    reqs = [request(p[0], "qv-r4", 60), request(p[1], "", 60), request(p[2], "mlp-r64", 60, sampling=hot)]
    reqs.append(request(p[3], "all-r16-pattern", 60, stream=True))
    engine = make_engine(assets / "base", assets / "adapters", kv_cache_memory=f"{320 * BYTES_PER_TOKEN}")
    assert engine.kv.num_blocks == 20
    outs = run_all(engine, reqs)
    alone = make_engine(assets / "base", assets / "adapters")
    (ref_hot,) = run_all(alone, [request(p[2], "mlp-r64", 60, sampling=hot)])
    engine.shutdown()
    alone.shutdown()
    assert total(engine, "lora_engine_preemptions_total") >= 1
    for i in (0, 1, 3):
        assert outs[i].token_ids == peft_generate(peft_model, reqs[i].input_ids, reqs[i].lora_name, 60), i
    assert len(outs[3].outputs) == 60  # streamed: each token once, none again after a preemption
    assert outs[2].final.token_ids == ref_hot.final.token_ids
    assert all_blocks_free(engine) and all(s.refs == 0 for s in engine.adapters.slots)


@pytest.fixture
def attention_as():
    """Registers a wrapper of the engine's attention: the model then calls it instead."""
    yield lambda wrapper: AttentionInterface.register(model_runner.ATTENTION, wrapper)
    AttentionInterface.register(model_runner.ATTENTION, model_runner.engine_attention)


def test_an_attention_argument_we_do_not_apply_refuses_the_model(assets, attention_as):
    def one_more_argument(module, q, k, v, mask, **kwargs):
        return model_runner.engine_attention(module, q, k, v, mask, alibi_slopes=torch.ones(4), **kwargs)

    attention_as(one_more_argument)
    with pytest.raises(UnsupportedAttention, match=r"LlamaForCausalLM layer .*: the attention argument 'alibi_slopes'"):
        make_engine(assets / "base", assets / "adapters")


def test_a_layer_that_bypasses_the_attention_interface_is_refused(assets, attention_as):
    def skip_layer_1(module, q, k, v, mask, **kwargs):
        if module.layer_idx == 1:
            return torch.zeros_like(q).transpose(1, 2), None
        return model_runner.engine_attention(module, q, k, v, mask, **kwargs)

    attention_as(skip_layer_1)
    with pytest.raises(UnsupportedAttention, match=r"layer model.layers.1.self_attn does not go through"):
        make_engine(assets / "base", assets / "adapters")


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("feature", ["plain", "window", "softcap", "sinks", "all"])
def test_attend_matches_eager_attention(feature, sliced, monkeypatch):
    """attend() (SDPA, or the explicit path for soft-capping and sinks) against a plain reference,
    for a prompt chunk after cached keys and for decode tokens of different lengths."""
    if sliced:  # a chunk after a long prefix goes in slices of queries: here of 2
        monkeypatch.setattr(attention, "MASKED_SCORES_BYTES", 2 * 4 * 10 * 4)
    torch.manual_seed(0)
    args = AttnArgs(
        scale=0.3,
        softcap=2.0 if feature in ("softcap", "all") else 0.0,
        window=5 if feature in ("window", "all") else 0,
        sinks=torch.randn(4) if feature in ("sinks", "all") else None,
    )
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    torch.testing.assert_close(attend(q, k, v, args, 4), reference(q, k, v, args, [4]))
    qd = torch.randn(3, 4, 1, 8)
    kd, vd = torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    torch.testing.assert_close(
        attend(qd, kd, vd, args, torch.tensor([9, 0, 4])), reference(qd, kd, vd, args, [9, 0, 4])
    )


def reference(q, k, v, args: AttnArgs, starts) -> torch.Tensor:
    out = torch.empty_like(q)
    for b, start in enumerate(starts):
        for h in range(q.shape[1]):
            kh, vh = k[b, h // (q.shape[1] // k.shape[1])], v[b, h // (q.shape[1] // k.shape[1])]
            for i in range(q.shape[2]):
                pos = start + i
                s = (kh[: pos + 1] @ q[b, h, i]) * args.scale
                if args.softcap:
                    s = torch.tanh(s / args.softcap) * args.softcap
                if args.window:
                    s[: max(pos + 1 - args.window, 0)] = float("-inf")
                if args.sinks is not None:
                    s = torch.cat([s, args.sinks[h : h + 1]])
                w = torch.softmax(s, 0)[: pos + 1]
                out[b, h, i] = w @ vh[: pos + 1]
    return out


def test_settings_come_from_the_environment_too(tmp_path):
    params = {"max_model_len": "100", "kv_cache_memory": "1GiB", "base_model": "models/x"}
    env = {"LORA_MAX_MODEL_LEN": "50", "LORA_KV_CACHE_MEMORY": " ", "LORA_ALLOW_ADAPTER_SYMLINKS": "true"}
    cfg = EngineConfig.from_parameters(params, root=tmp_path, env=env)
    assert cfg.max_model_len == 50 and cfg.kv_cache_memory == "1GiB" and cfg.allow_adapter_symlinks
    assert cfg.base_model == tmp_path / "models" / "x"
    shown = cfg.as_parameters()
    assert shown["max_model_len"] == "50" and shown["base_model"] == str(tmp_path / "models" / "x")
    assert shown["allow_adapter_symlinks"] == "true"
    with pytest.raises(ValueError, match="setting LORA_MAX_NUM_SEQS: invalid literal"):
        EngineConfig.from_parameters({}, env={"LORA_MAX_NUM_SEQS": "many"})


def test_the_paged_kernel_serves_the_engine_exactly(assets, peft_model, vocab):
    """attention_backend=triton (the paged decode kernel; here under Triton's interpreter) in a mixed,
    chunked batch with K/V in blocks of 4 tokens: every greedy output equals PEFT's."""
    engine = make_engine(
        assets / "base", assets / "adapters", attention_backend="triton", kv_block_size=4, max_prefill_tokens=8
    )
    assert engine.runner.layers[0].paged.kernel is not None
    p = prompts(vocab, [3, 13, 20, 1, 9], seed=61)
    names = ["", "qv-r4", "mlp-r64", "all-r16-pattern", "qv-r4"]
    outs = run_all(engine, [request(ids, n, 5) for ids, n in zip(p, names)])
    engine.shutdown()
    for ids, n, out in zip(p, names, outs):
        assert out.final.token_ids == peft_generate(peft_model, ids, n, 5), n
