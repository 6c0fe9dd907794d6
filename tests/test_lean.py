"""The lean forward of the Llama family (backend/model/lean.py) gives transformers' logits, bit for bit: prompt
steps, prompt chunks after cached keys, decode steps, LoRA in fused and lone layers, biases, sliding windows.
The engine's parity with PEFT over these architectures is tests/test_engine.py's."""

import pytest
import torch

from backend.model.input_batch import SeqWork
from backend.model.runner import ModelRunner
from demo.builders import build_base

VOCAB = 128
MODELS = {
    "llama": ("llama", {}),
    "llama-dynamic-rope": ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "mistral": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
}


@pytest.fixture(scope="module", params=list(MODELS))
def runner(request, tmp_path_factory) -> ModelRunner:
    arch, config = MODELS[request.param]
    base = build_base(tmp_path_factory.mktemp(request.param), arch=arch, vocab_size=VOCAB, **config)
    run = ModelRunner(
        base, dtype=torch.float32, device="cpu", max_seqs=4, max_len=0, num_slots=2, max_rank=8, kv_block_size=4
    )
    assert run.lean is not None
    gen = torch.Generator().manual_seed(0)
    for i, layer in enumerate(run.lora.layers.values()):  # slot 0 on every layer, slot 1 on every other one
        for slot in (0, 1) if i % 2 else (0,):
            a = torch.randn(4 + 4 * slot, layer.d_in, generator=gen) * 0.1
            b = torch.randn(layer.d_out, a.shape[0], generator=gen) * 0.1
            layer.set_slot(slot, a, b, 2.0)
    return run


def both(run: ModelRunner, work: list[SeqWork]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of transformers' forward, then of the lean one, for the same step (each writes the same K/V)."""
    lean, run.lean = run.lean, None
    try:
        reference = run.forward(run.make_step(work))
    finally:
        run.lean = lean
    return reference, run.forward(run.make_step(work))


def test_lean_forward_equals_transformers(runner):
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (9, 5, 14)]
    tables = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    slots = [-1, 0, 1]
    # prompts: two whole, the third's first chunk
    steps = [[SeqWork(tables[0], ids[0], 0, slots[0]), SeqWork(tables[1], ids[1], 0, slots[1])]]
    steps[0].append(SeqWork(tables[2], ids[2][:6], 0, slots[2], sample=False))
    # decode beside the third's last chunk, after its cached keys; then decode only
    steps.append([SeqWork(tables[0], [7], 9, slots[0]), SeqWork(tables[1], [8], 5, slots[1])])
    steps[1].append(SeqWork(tables[2], ids[2][6:], 6, slots[2]))
    steps.append([SeqWork(t, [9 + i], n, s) for i, (t, n, s) in enumerate(zip(tables, [10, 6, 14], slots))])
    for work in steps:
        reference, lean = both(runner, work)
        assert lean.shape == (sum(w.sample for w in work), VOCAB)
        assert torch.equal(lean, reference)
