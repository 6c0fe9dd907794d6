"""Request-time mixing: `lora_name` (or the OpenAI `model`) `a:0.7,b:-0.3` is served as PEFT's
add_weighted_adapter(..., combination_type="cat"), exact at rank Σr_i, in the same batch as everything else."""

import pytest

from backend.errors import RequestError
from backend.naming import lora_key
from tests.conftest import MIX, generate_together, peft_generate
from tests.test_engine import Collector, drive, make_engine, prompts, request, warm_and_drive


@pytest.mark.parametrize(
    "given, key",
    [("a:0.70, b:-0.3", "a:0.7,b:-0.3"), ("a,b", "a:1.0,b:1.0"), ("a:2", "a:2.0"), ("qv-r4", "qv-r4")],
)
def test_a_mix_has_one_canonical_name(given, key):
    assert lora_key(given) == key


@pytest.mark.parametrize(
    "given, message",
    [
        ("a:x,b", "LoRA mix 'a:x,b': the weight 'x' of 'a' is not a number"),
        ("a:inf", "LoRA mix 'a:inf': the weight of 'a' is not finite"),
        ("a,b,a", "LoRA mix 'a,b,a' names an adapter twice"),
        (",".join("abcdefghi"), "LoRA mix 'a,b,c,d,e,f,g,h,i' has 9 parts; at most 8"),
        ("a b:1", "invalid LoRA adapter name 'a b'"),
    ],
)
def test_a_bad_mix_is_refused_with_the_reason(given, message):
    with pytest.raises(RequestError, match="^" + message.replace("(", r"\(")):
        lora_key(given)


def test_a_mix_beside_its_parts_and_the_base_in_one_step_equals_peft(assets, peft_mix, vocab, engines):
    engine = make_engine(assets / "base", assets / "adapters")
    engines.append(engine)
    ps = prompts(vocab, [5, 7, 9, 6], seed=8)
    names = [lora_key(MIX), "qv-r4", "", "attn-r8-rslora"]
    collectors = warm_and_drive(engine, ps, names, 6)  # all four join the first step
    for p, name, c in zip(ps, names, collectors):
        assert c.final.token_ids == peft_generate(peft_mix, p, "mix" if "," in name else name, 6), name
    assert engine.metrics.get("lora_engine_max_adapters_per_step") == 4
    assert engine.metrics.get("lora_requests_total", adapter=lora_key(MIX)) == 1
    engine.report()  # a mix's name holds commas: the residency label's list leaves it out
    assert dict(engine.metrics.lora_info)["running_lora_adapters"] == "attn-r8-rslora,qv-r4"


def test_a_mix_above_max_lora_rank_is_refused_with_the_ranks(assets, vocab, engines):
    engine = make_engine(assets / "base", assets / "adapters", max_lora_rank=8)
    engines.append(engine)
    c = Collector()
    engine.submit(request(prompts(vocab, [5])[0], lora_key(MIX), 2), c)
    drive(engine, [c])
    assert c.final.error.code == "INVALID_ARG"
    assert f"LoRA mix '{lora_key(MIX)}': rank 12 at 'model.layers.0.self_attn.q_proj'" in c.final.error.message
    assert "(the sum of its parts' ranks 4+8) is above the configured max_lora_rank 8" in c.final.error.message


def test_a_mix_through_the_server_equals_peft_beside_other_requests(server, peft_mix, vocab):
    ps = prompts(vocab, [6, 4, 8], seed=12)
    names = ["qv-r4:0.7, attn-r8-rslora:-0.3", "qv-r4", None]
    before = server.metric("lora_requests_total", adapter=lora_key(MIX))
    outs = generate_together(server, ps, names, 8)
    for p, name, out in zip(ps, names, outs):
        assert out.token_ids == peft_generate(peft_mix, p, "mix" if name and "," in name else name or "", 8), name
    assert server.metric("lora_requests_total", adapter=lora_key(MIX)) == before + 1
