"""Hybrid serving (merged_loras): one adapter merged into the served weights at load; its requests run on the
weights alone, and other adapters and the base through their delta minus its, in the same batch, equal to PEFT."""

import shutil

import pytest

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from backend.model.hybrid import requested_as, served_as
from client.server import TritonServer
from tests.conftest import generate_together, peft_generate
from tests.test_engine import Collector, drive, make_engine, prompts, request, warm

HOT, OTHER = "qv-r4", "attn-r8-rslora"


@pytest.mark.parametrize(
    "name, served",
    [
        (HOT, ""),
        ("", f"{HOT}:-1.0"),
        (OTHER, f"{OTHER}:1.0,{HOT}:-1.0"),
        (f"{OTHER}:0.5,{HOT}:0.25", f"{OTHER}:0.5,{HOT}:-0.75"),
        (f"{HOT}:2", f"{HOT}:1.0"),
    ],
)
def test_what_serves_each_request(name, served):
    assert served_as(name, HOT) == served


def test_hot_other_and_base_in_one_step_equal_peft(assets, peft_model, vocab, engines, tmp_path):
    """Also once the merged adapter's folder holds another adapter: what is merged is fixed at load, and
    every request subtracts that version."""
    adapters = shutil.copytree(assets / "adapters", tmp_path / "adapters")
    engine = make_engine(assets / "base", adapters, merged_loras=HOT)
    engines.append(engine)
    shutil.rmtree(adapters / HOT)
    shutil.copytree(assets / "adapters" / "mlp-r64", adapters / HOT)
    ps = prompts(vocab, [5, 7, 9, 6], seed=14)
    names = [HOT, OTHER, "", HOT]
    warm(engine, served_as(OTHER, HOT), served_as("", HOT))  # read first: all join the first step
    collectors = [Collector() for _ in names]
    for p, name, c in zip(ps, names, collectors):
        engine.submit(request(p, name, 6), c)
    drive(engine, collectors)
    for p, name, c in zip(ps, names, collectors):
        assert c.final.token_ids == peft_generate(peft_model, p, name, 6), name
    m = engine.metrics
    assert m.get("lora_engine_max_adapters_per_step") == 3
    assert m.get("lora_adapter_merged", adapter=HOT) == 1 and m.get("lora_requests_total", adapter=HOT) == 2
    assert HOT not in engine.adapters.resident()  # its requests took no slot
    engine.report()
    assert dict(m.lora_info)["running_lora_adapters"] == f"{OTHER},{HOT}"  # both served here without a read


def test_what_hybrid_cannot_serve_exactly_is_refused(assets, vocab, engines):
    with pytest.raises(ValueError, match="merged_loras needs dtype float32: in bfloat16, W \\+ Δ rounds"):
        make_engine(assets / "base", assets / "adapters", merged_loras=HOT, dtype="bfloat16")
    with pytest.raises(ValueError, match="merged_loras names 2 adapters; one for now"):
        make_engine(assets / "base", assets / "adapters", merged_loras=f"{HOT},{OTHER}")
    engine = make_engine(assets / "base", assets / "adapters", merged_loras=HOT, max_lora_rank=8)
    engines.append(engine)
    c = Collector()
    engine.submit(request(prompts(vocab, [4])[0], OTHER, 2), c)  # q and v: 8 + 4, above max_lora_rank 8
    drive(engine, [c])
    assert "rank 12 at 'model.layers.0.self_attn.q_proj'" in c.final.error.message
    assert "(the sum of its parts' ranks 8+4) is above the configured max_lora_rank 8" in c.final.error.message


def test_hybrid_through_the_server_equals_peft(assets, peft_model, vocab):
    env = {ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters"), "LORA_MERGED_LORAS": HOT}
    ps = prompts(vocab, [6, 4, 8, 5], seed=15)
    names = [HOT, OTHER, None, "all-r16-pattern"]
    with TritonServer(env=env, models=["lora_llm"]) as server:
        outs = generate_together(server, ps, names, 8)
        assert server.metric("lora_adapter_merged", adapter=HOT) == 1
    for p, name, out in zip(ps, names, outs):
        assert out.token_ids == peft_generate(peft_model, p, name or "", 8), name


@pytest.mark.parametrize("name", ["", OTHER, f"{OTHER}:0.5,{HOT}:0.25", "all-r16-pattern:-2.0"])
def test_each_request_is_named_back_from_what_serves_it(name):
    """Requests reach the engine with canonical names (lora_key)."""
    assert requested_as(served_as(name, HOT), HOT) == name
