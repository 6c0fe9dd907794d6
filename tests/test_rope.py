"""RoPE per sequence (backend/model/rope.py). transformers' longrope and dynamic rope types take their frequencies
from the largest position in the batch; the engine runs a whole step as one row, so without backend/model/rope.py a
long sequence changes the logits of a short one in the same step. fp32 on CPU, random tiny models."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from backend.config import context_length
from backend.model.checks import UnsupportedModel
from backend.model.rope import per_sequence_rope
from backend.model.runner import ModelRunner, SeqWork
from demo.builders import build_adapter, build_base
from tests.conftest import peft_generate
from tests.test_engine import make_engine, prompts, request, run_all

VOCAB = 128
ORIGINAL = 64  # the length past which each rope type below changes its frequencies
SHORT, LONG, CROSSING = 10, 100, 60  # CROSSING passes ORIGINAL while it decodes
HEAD = 16  # head_dim: longrope has one factor per frequency, HEAD // 2 of them


def longrope_parameters() -> dict:
    short = [1.0 + 0.1 * i for i in range(HEAD // 2)]
    return dict(
        rope_type="longrope",
        rope_theta=10000.0,
        short_factor=short,
        long_factor=[4 * f for f in short],
        original_max_position_embeddings=ORIGINAL,
    )


def longrope(**sizes) -> dict:
    return dict(
        max_position_embeddings=256,
        original_max_position_embeddings=ORIGINAL,  # Phi-3 reads it here, over rope_parameters'
        rope_parameters=longrope_parameters(),
        **sizes,
    )


ROPES = {
    # name: (architecture, config, LoRA of adapter "a")
    "phi3-longrope": (  # Phi-3-mini-128k / Phi-3.5: longrope
        "phi3",
        longrope(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
        dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"]),
    ),
    "llama-longrope": ("llama", longrope(), dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-dynamic": (  # dynamic NTK rescales past max_position_embeddings: the context is 4 times that
        "llama",
        dict(
            max_position_embeddings=ORIGINAL, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0)
        ),
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    ),
    "gemma3-longrope-global": (  # one rotary module, a rope type per layer type: longrope on the global layers
        "gemma3_text",
        dict(
            max_position_embeddings=256,
            head_dim=HEAD,
            query_pre_attn_scalar=HEAD,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=dict(
                full_attention=longrope_parameters(),
                sliding_attention=dict(rope_type="default", rope_theta=10000.0),
            ),
        ),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
    ),
}


@pytest.fixture(scope="module", params=list(ROPES))
def rope_base(request, tmp_path_factory):
    arch, config, lora = ROPES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = build_base(root / "base", arch=arch, vocab_size=VOCAB, **config)
    build_adapter(base, root / "adapters" / "a", seed=5, **lora)
    return root


def runner(base) -> ModelRunner:
    return ModelRunner(base, dtype=torch.float32, device="cpu", max_seqs=3, max_len=0, num_slots=1, max_rank=8)


def logits(run: ModelRunner, work: list[SeqWork]) -> torch.Tensor:
    return run.forward(run.make_step(work))


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-2


def test_sequences_in_one_step_equal_each_alone(rope_base, monkeypatch):
    """A short and two long (past ORIGINAL) sequences, prefilled in one step and then decoded in one step: each
    one's logits equal its own run alone. Without per-sequence RoPE the short one's would not."""
    lengths = [SHORT, LONG, 80]
    tables = [[0], list(range(1, 8)), list(range(8, 14))]  # blocks of 16 tokens
    prefill = [SeqWork(t, p, 0, -1) for t, p in zip(tables, prompts(VOCAB, lengths, seed=1))]
    decode = [SeqWork(t, [7 + i], n, -1) for i, (t, n) in enumerate(zip(tables, lengths))]
    run = runner(rope_base / "base")
    assert run.rope == ["model.rotary_emb"]
    for work in (prefill, decode):
        together = logits(run, work)
        for i, alone in enumerate(work):
            assert_same(together[i], logits(run, [alone])[0])

    monkeypatch.setattr("backend.model.runner.per_sequence_rope", lambda *a: [])
    plain = runner(rope_base / "base")  # the premise: one row's RoPE follows its longest sequence
    assert differ(logits(plain, prefill)[0], logits(plain, prefill[:1])[0])


def test_prompt_in_chunks_takes_its_whole_length(rope_base):
    """A long prompt fed in chunks whose SeqWork carries the prompt's whole length gets the logits of the
    prompt fed at once (transformers' generate prefills it at once). A chunk that says nothing of the whole
    length takes its frequencies from its own last position: a chunk that ends before ORIGINAL gets the
    short (longrope) or original (dynamic) frequencies, and the prompt's logits differ."""
    (long,) = prompts(VOCAB, [LONG], seed=2)
    table, cut = list(range(7)), 40
    run = runner(rope_base / "base")
    whole = logits(run, [SeqWork(table, long, 0, -1)])
    logits(run, [SeqWork(table, long[:cut], 0, -1, sample=False, length=LONG)])
    assert_same(logits(run, [SeqWork(table, long[cut:], cut, -1, length=LONG)]), whole)
    logits(run, [SeqWork(table, long[:cut], 0, -1, sample=False)])
    assert differ(logits(run, [SeqWork(table, long[cut:], cut, -1)]), whole)


def reference(root, ids: list[int], adapter: str, max_tokens: int) -> list[int]:
    """PEFT's generate on a fresh model: dynamic RoPE keeps the longest length it has seen across calls."""
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, root / "adapters" / "a", adapter_name="a").eval()
    return peft_generate(model, ids, adapter, max_tokens)


def test_mixed_lengths_match_peft(rope_base):
    """Short, long and crossing prompts, base and adapter, all in the same steps of one engine: each output
    equals PEFT's generate of that prompt alone. Where HF differs: (1) Phi-3's generate (and PhiMoE's) throws
    its KV cache away and recomputes it with the long factors when a sequence first passes ORIGINAL; the
    engine keeps the keys it computed, as Llama's and Gemma-3's generate do: no crossing case on Phi-3.
    (2) Prompts are fed whole here: a prompt fed in chunks matches HF only where the engine passes its whole
    length (SeqWork.length, test_prompt_in_chunks_takes_its_whole_length)."""
    short, long, crossing = prompts(VOCAB, [SHORT, LONG, CROSSING], seed=3)
    cases = [("", short), ("a", short), ("", long), ("a", long)]
    if "phi3" not in rope_base.name:
        cases += [("a", crossing)]
    engine = make_engine(rope_base / "base", rope_base / "adapters", max_num_seqs=len(cases))
    try:
        outs = run_all(engine, [request(p, n, max_tokens=8) for n, p in cases])
    finally:
        engine.shutdown()
    for (n, p), out in zip(cases, outs):
        assert out.final.error is None, out.final.error
        assert out.final.token_ids == reference(rope_base, p, n, 8), (n, len(p))
    assert outs[2].final.token_ids != outs[3].final.token_ids  # the adapter changes the long prompt's output


def test_batch_dependent_rope_outside_a_rotary_module_is_refused():
    """A config whose RoPE depends on the batch, on a model with no rotary module to call per sequence."""
    config = AutoConfig.for_model(
        "phi3", vocab_size=VOCAB, pad_token_id=0, num_hidden_layers=1, **longrope(hidden_size=64, num_attention_heads=4)
    )
    model = AutoModelForCausalLM.from_config(config)
    del model.model.rotary_emb.rope_type
    with pytest.raises(UnsupportedModel, match=r"Phi3ForCausalLM: rope type 'longrope' takes its frequencies"):
        per_sequence_rope(model, "Phi3ForCausalLM", lambda: None)


@pytest.mark.parametrize(
    "rope, expected",
    [
        (dict(rope_parameters=dict(rope_type="dynamic", factor=4.0)), 256),
        (dict(rope_scaling=dict(type="dynamic", factor=2.0)), 128),  # an older config.json
        (dict(rope_parameters=dict(rope_type="dynamic", factor=1.0, alpha=1000.0)), 64),  # HunYuan: fixed NTK
        (dict(rope_parameters=longrope_parameters()), 64),
        ({}, 64),
    ],
)
def test_dynamic_rope_context_is_scaled(rope, expected):
    """Dynamic NTK only rescales past max_position_embeddings: the engine's context is that times `factor`."""
    assert context_length({"max_position_embeddings": ORIGINAL, **rope}) == expected
    assert context_length({"max_position_embeddings": ORIGINAL, **rope}, 100) == min(expected, 100)
