"""Prefix caching: full KV blocks shared by sequences whose token chains match under the same adapter
version; a hit skips those tokens' computation and changes no output (PEFT's), across adapters,
versions, preemption and an update in the middle."""

import shutil

import pytest

from backend.engine.block_pool import BlockPool, chain_hashes
from tests.conftest import peft_generate
from tests.test_engine import all_blocks_free, drive, make_engine, prompts, request, submit_all, total, warm

BS = 16  # the engine's default kv_block_size


def test_blocks_are_taken_and_given_back():
    pool = BlockPool(4, 4)
    a, b = [], []
    assert pool.grow(a, 5) and len(a) == 2
    assert pool.grow(a, 8) and len(a) == 2 and pool.grow(b, 8) and not pool.grow(b, 9)
    assert len(b) == 2 and not pool.free and pool.in_use == 4
    pool.release(a)
    assert a == [] and len(pool.free) == 2 and pool.in_use == 2


def test_a_full_block_is_found_by_its_chain_under_its_key_only():
    tokens = list(range(10))
    assert chain_hashes(tokens, 4, "a@1", []) == chain_hashes(tokens + [99], 4, "a@1", [])  # full blocks only
    assert len(chain_hashes(tokens, 4, "a@1", [])) == 2
    assert chain_hashes(tokens, 4, "a@1", [])[1] != chain_hashes([0, 1, 2, 7, *tokens[4:]], 4, "a@1", [])[1]
    assert not set(chain_hashes(tokens, 4, "a@1", [])) & set(chain_hashes(tokens, 4, "a@2", []))
    pool = BlockPool(4, 4)
    table = []
    pool.grow(table, 10)
    hashes = chain_hashes(tokens, 4, "a@1", [])
    for block, h in zip(table, hashes):
        pool.register(block, h)
    full = table[:2]
    assert pool.match(hashes) == full and pool.match(chain_hashes(tokens, 4, "b@1", [])) == []
    pool.release(table)  # freed, still findable
    other = []
    pool.share(pool.match(hashes), other)
    assert other == full and pool.refs[full[0]] == 1 and full[0] not in pool.free and full[1] not in pool.free


def test_free_blocks_are_reused_least_recently_freed_first_and_a_chain_s_tail_before_its_head():
    pool = BlockPool(4, 2)
    first, second = [], []
    pool.grow(first, 4)
    pool.grow(second, 4)
    hashes = chain_hashes([1, 2, 3, 4], 2, "", [])
    for block, h in zip(first, hashes):
        pool.register(block, h)
    kept = list(first)
    pool.release(first)  # its tail block is freed first
    pool.release(second)
    taken = []
    pool.grow(taken, 2)  # one block: the least recently freed, first's tail
    assert taken == [kept[1]] and pool.match(hashes) == [kept[0]]
    assert pool.cached == 1


def test_a_shared_prefix_is_computed_once_and_outputs_equal_peft(assets, peft_model, vocab, engines):
    """Three requests for one adapter start with the same 40 tokens (2 full blocks): the first computes
    them, the later two (admitted after its prefill) find them. The same prompt for another adapter, and
    for the base, finds nothing."""
    engine = warm(make_engine(assets / "base", assets / "adapters"), "qv-r4", "mlp-r64")
    engines.append(engine)
    system = prompts(vocab, [40], seed=51)[0]
    turns = [t[1:] for t in prompts(vocab, [6, 9, 4], seed=52)]
    outs = submit_all(engine, [request(system + turns[0], "qv-r4", 5)])
    engine.step()  # its prompt is in: its 2 full blocks are findable
    assert engine.blocks.cached == 2
    later = [
        (system + turns[1], "qv-r4"),
        (system + turns[2], "qv-r4"),
        (system + turns[0], "mlp-r64"),
        (system + turns[0], ""),
    ]
    outs += submit_all(engine, [request(p, n, 5) for p, n in later])
    drive(engine, outs)
    cases = [(system + turns[0], "qv-r4"), *later]
    for (p, name), out in zip(cases, outs):
        assert out.final.error is None and out.final.token_ids == peft_generate(peft_model, p, name, 5), name
    queries = sum(len(p) for p, _ in cases)
    assert total(engine, "lora_engine_prefix_cache_queries_total") == queries
    assert total(engine, "lora_engine_prefix_cache_hits_total") == 2 * 2 * BS  # two requests, two blocks each
    engine.report()  # the loop publishes the gauges after each step; drive() steps alone
    assert engine.metrics.get("lora_prefix_cache_hit_rate") == pytest.approx(64 / queries)
    assert all_blocks_free(engine) and engine.blocks.cached > 0  # freed, still findable


@pytest.mark.parametrize("turns, hits", [([9, 11, 13], 2 * 32), ([5, 7, 9], 32 + 28)], ids=["waiting", "begun"])
def test_requests_that_arrive_together_compute_their_common_prefix_once(
    assets, peft_model, vocab, engines, turns, hits
):
    """Fed 48 prompt tokens a step, three requests admitted together: the first computes the shared 40;
    the others take its blocks instead of their own, whether they waited for their first chunk or had
    begun (the second, fed 4 tokens beside a first of 44, computes those 4 and no more)."""
    engine = warm(make_engine(assets / "base", assets / "adapters", max_prefill_tokens=48), "qv-r4")
    engines.append(engine)
    system = prompts(vocab, [40], seed=57)[0]
    ps = [system + t[1:] for t in prompts(vocab, turns, seed=58)]
    outs = submit_all(engine, [request(p, "qv-r4", 4) for p in ps])
    drive(engine, outs)
    for p, out in zip(ps, outs):
        assert out.final.token_ids == peft_generate(peft_model, p, "qv-r4", 4)
    assert total(engine, "lora_engine_prefix_cache_hits_total") == hits
    assert all_blocks_free(engine)


def test_a_whole_cached_prompt_still_computes_its_last_token(assets, peft_model, vocab, engines):
    engine = make_engine(assets / "base", assets / "adapters")
    engines.append(engine)
    p = prompts(vocab, [32], seed=53)[0]  # exactly two blocks: the second holds the last token
    for _ in range(2):
        outs = submit_all(engine, [request(p, "", 4)])
        drive(engine, outs)
        assert outs[0].final.token_ids == peft_generate(peft_model, p, "", 4)
    assert total(engine, "lora_engine_prefix_cache_hits_total") == BS  # the first block; the second is fed


def test_a_new_adapter_version_never_reuses_the_old_version_s_blocks(assets, peft_model, vocab, engines, tmp_path):
    """An update in the middle: the folder changes while a request of the old version runs; a request
    after it gets the new version, computes its prompt again, and its output is the new version's."""
    adapters = shutil.copytree(assets / "adapters", tmp_path / "adapters")
    engine = make_engine(assets / "base", adapters)
    engines.append(engine)
    p = prompts(vocab, [40], seed=54)[0]
    old = submit_all(engine, [request(p, "qv-r4", 6)])
    while not (engine.running and engine.running[0].out_ids):  # its prompt is in (read, then prefilled)
        engine.step() or engine.wake.wait(0.01)
    shutil.rmtree(adapters / "qv-r4")
    shutil.copytree(assets / "adapters" / "attn-r8-rslora", adapters / "qv-r4")
    new = submit_all(engine, [request(p, "qv-r4", 6)])
    drive(engine, old + new)
    assert old[0].final.token_ids == peft_generate(peft_model, p, "qv-r4", 6)
    assert new[0].final.token_ids == peft_generate(peft_model, p, "attn-r8-rslora", 6)
    assert old[0].final.adapter_version != new[0].final.adapter_version
    assert total(engine, "lora_engine_prefix_cache_hits_total") == 0


def test_preempted_sequences_find_their_own_blocks_and_stay_exact(assets, peft_model, vocab, engines):
    """A cache of 20 blocks and four requests that grow to 100 tokens: the newest are preempted, and when
    they are fed again their blocks (prompt and output so far) are found where the pool has kept them."""
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head dim x fp32
    engine = make_engine(assets / "base", assets / "adapters", kv_cache_memory=f"{320 * bytes_per_token}")
    engines.append(engine)
    assert engine.kv.num_blocks == 20
    p = prompts(vocab, [40, 41, 39, 42], seed=55)
    names = ["qv-r4", "", "mlp-r64", "all-r16-pattern"]
    outs = submit_all(engine, [request(x, n, 60) for x, n in zip(p, names)])
    drive(engine, outs, max_steps=1000)
    assert total(engine, "lora_engine_preemptions_total") >= 1
    assert total(engine, "lora_engine_prefix_cache_hits_total") > 0
    for x, n, out in zip(p, names, outs):
        assert out.final.token_ids == peft_generate(peft_model, x, n, 60), n
    assert all_blocks_free(engine)


def test_prefix_caching_can_be_turned_off(assets, peft_model, vocab, engines):
    engine = make_engine(assets / "base", assets / "adapters", enable_prefix_caching=False)
    engines.append(engine)
    p = prompts(vocab, [40], seed=56)[0]
    for _ in range(2):
        outs = submit_all(engine, [request(p, "", 3)])
        drive(engine, outs)
        assert outs[0].final.token_ids == peft_generate(peft_model, p, "", 3)
    assert total(engine, "lora_engine_prefix_cache_queries_total") == 0 and engine.blocks.cached == 0
