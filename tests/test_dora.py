"""DoRA (use_dora) in mixed batches: y = g ⊙ (W·x + s·B·A·x) + b with g = m / ‖W + s·B·A‖ per output row,
computed once when the adapter is read and applied by slot after the LoRA delta, equal to PEFT's greedy
outputs and log-probs on every layer kind: fused q/k/v and gate/up, lone linear layers, Conv1D, biases and
the output layer."""

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from backend.model.hybrid import served_as
from client.server import TritonServer
from demo.builders import build_adapter, build_base
from tests.conftest import NEVER, generate_together
from tests.test_engine import drive, make_engine, prompts, request, submit_all, warm

DORA = {
    "dora-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "dora-all": dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"down_proj": 4}, use_dora=True),
}
HEAD_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"


def peft_reference(base: Path, adapters: Path, names: list[str]) -> "Reference":
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters / name, adapter_name=name)
    return Reference(model.eval())


@pytest.fixture(scope="module")
def dora_dir(assets, tmp_path_factory) -> Path:
    """DORA's adapters, dora-head (q_proj and lm_head) and a copy of the plain LoRA qv-r4."""
    root = tmp_path_factory.mktemp("dora") / "adapters"
    for i, (name, lora) in enumerate(DORA.items()):
        build_adapter(assets / "base", root / name, seed=40 + i, **lora)
    build_adapter(
        assets / "base", root / "dora-head", seed=43, r=4, target_modules=["q_proj", "lm_head"], use_dora=True
    )
    shutil.copytree(assets / "adapters" / "qv-r4", root / "qv-r4")
    return root


@pytest.fixture(scope="module")
def peft_dora(assets, dora_dir):
    return peft_reference(assets / "base", dora_dir, ["dora-qv", "dora-all", "dora-head", "qv-r4"])


class Reference:
    """PEFT with one adapter active at a time (or none): its mixed batches (adapter_names) refuse DoRA."""

    def __init__(self, model: PeftModel):
        self.model = model

    @contextmanager
    def active(self, adapter: str):
        if not adapter:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(adapter)
            yield self.model

    @torch.no_grad()
    def generate(self, ids: list[int], adapter: str, max_tokens: int) -> list[int]:
        with self.active(adapter) as model:
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=NEVER,
                pad_token_id=0,
            )
        return out[0, len(ids) :].tolist()

    @torch.no_grad()
    def logprobs(self, ids: list[int], adapter: str, out: list[int]) -> torch.Tensor:
        with self.active(adapter) as model:
            logits = model(input_ids=torch.tensor([ids + out[:-1]])).logits
        logprobs = torch.log_softmax(logits[0, len(ids) - 1 :].float(), -1)
        return logprobs.gather(1, torch.tensor(out)[:, None])[:, 0]


def check_against_peft(engine, model, ps: list[list[int]], names: list[str], max_tokens: int = 6) -> None:
    """All in one step: their adapters are read first (what a request is served by, under hybrid serving)."""
    warm(engine, *{served_as(n, engine.merged) if engine.merged else n for n in names} - {""})
    outs = submit_all(engine, [request(p, n, max_tokens) for p, n in zip(ps, names)])
    drive(engine, outs)
    assert engine.metrics.get("lora_engine_max_adapters_per_step") == len(set(names))  # the base counts as one
    for p, name, out in zip(ps, names, outs):
        assert out.final.error is None, out.final.error
        assert out.final.token_ids == model.generate(p, name, max_tokens), name
        expected = model.logprobs(p, name, out.final.token_ids)
        torch.testing.assert_close(torch.tensor(out.final.log_probs), expected, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dora_lora_and_base_in_one_step_equal_peft(assets, vocab, dora_dir, peft_dora, engines, backend):
    """q/k/v and gate/up groups (a DoRA adapter on q and v only leaves k's columns as they are), o and down."""
    engine = make_engine(assets / "base", dora_dir, lora_backend=backend)
    engines.append(engine)
    ps = prompts(vocab, [5, 7, 4, 9, 6], seed=41)
    check_against_peft(engine, peft_dora, ps, ["dora-qv", "qv-r4", "", "dora-all", "dora-qv"])


def test_dora_on_the_output_layer_equals_peft(assets, vocab, dora_dir, peft_dora, engines):
    """lm_head sees each sequence's last token only: g is applied to those rows, by their slots."""
    engine = make_engine(assets / "base", dora_dir, lora_target_modules=HEAD_TARGETS)
    engines.append(engine)
    check_against_peft(engine, peft_dora, prompts(vocab, [6, 3, 8], seed=42), ["dora-head", "", "dora-all"])


def with_random_biases(base: Path) -> Path:
    """Biases start at zero: random ones make a forgotten bias in DoRA's scale show."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    model.save_pretrained(base)
    return base


@pytest.mark.parametrize(
    "arch, targets",
    [("qwen2", "all-linear"), ("gpt2", ["c_attn", "c_proj", "c_fc"])],
    ids=["qwen2-bias", "gpt2-conv1d"],
)
def test_dora_on_biased_and_conv1d_layers_equals_peft(tmp_path, arch, targets, engines):
    """Qwen2's q/k/v biases are not scaled by g (c = (1 - g) ⊙ b); GPT-2's Conv1D stores W as [d_in, d_out]."""
    base = with_random_biases(build_base(tmp_path / "base", arch=arch, vocab_size=128))
    adapters = tmp_path / "adapters"
    build_adapter(base, adapters / "dora", seed=44, r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    engine = make_engine(base, adapters)
    engines.append(engine)
    model = peft_reference(base, adapters, ["dora"])
    check_against_peft(engine, model, prompts(128, [5, 7], seed=45), ["dora", ""])


def test_hybrid_serves_a_dora_adapter_and_refuses_one_as_merged(assets, vocab, dora_dir, peft_dora, engines):
    """Hybrid: a DoRA adapter x is served as `x:1,h:-1` on W + Δh, its direction normalized as ‖W + Δx‖.
    A DoRA adapter cannot be the merged one, nor part of a mix a request names."""
    engine = make_engine(assets / "base", dora_dir, merged_loras="qv-r4")
    engines.append(engine)
    check_against_peft(engine, peft_dora, prompts(vocab, [5, 7, 6], seed=46), ["dora-all", "qv-r4", ""])
    outs = submit_all(engine, [request(prompts(vocab, [4])[0], "dora-qv:0.5,dora-all:0.5", 2)])
    drive(engine, outs)
    assert outs[0].final.error.code == "INVALID_ARG"
    assert "'dora-qv' is a DoRA adapter, which cannot be mixed" in outs[0].final.error.message
    with pytest.raises(ValueError, match="merged_loras 'dora-qv' is a DoRA adapter"):
        make_engine(assets / "base", dora_dir, merged_loras="dora-qv")


def test_dora_through_the_server_equals_peft(assets, vocab, dora_dir, peft_dora):
    """DoRA, plain LoRA and base requests at once through tritonserver: tokens and log-probs as PEFT's."""
    env = {ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(dora_dir)}
    ps = prompts(vocab, [6, 4, 8, 5], seed=47)
    names = ["dora-all", "qv-r4", None, "dora-qv"]
    with TritonServer(env=env, models=["lora_llm"]) as server:
        outs = generate_together(server, ps, names, 8)
    for p, name, out in zip(ps, names, outs):
        assert out.token_ids == peft_dora.generate(p, name or "", 8), name
        expected = peft_dora.logprobs(p, name or "", out.token_ids)
        torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-4, rtol=0, msg=name)
