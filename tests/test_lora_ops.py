"""The torch LoRA path (backend/lora/ops.py) against the plain per-adapter formulation, over its three
layouts (padded in place, padded with gaps, grouped matmul), rows in place or gathered, fused slices,
mixed ranks and base-only tokens; and the layers' refusal of a token count their step does not have."""

import random

import pytest
import torch

from backend.lora import ops as lora_ops
from backend.lora.layers import LoRAContext, LoRALinear, LoRAStep

# dtype -> (atol, rtol); the per-adapter reference computes in fp32 and rounds once, the batched path in the dtype
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2.5e-1, 2e-2)}


def make_weights(widths, d_in, num_slots, ranks, dtype, seed=0) -> lora_ops.SlotWeights:
    """Slots filled with random adapters; ranks[slot] per slot (0 = empty), slice 1 of a fused group
    left out of slot 1 (an adapter that does not target every member)."""
    gen = torch.Generator().manual_seed(seed)
    w = lora_ops.SlotWeights.allocate(num_slots, 16, d_in, widths, dtype, "cpu")
    for slot, r in enumerate(ranks):
        for sl, width in enumerate(widths):
            if r == 0 or (slot == 1 and sl == 1):
                continue
            a = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(dtype)
            b = torch.randn(width, r, generator=gen).to(dtype)
            w.set(slot, sl, a, b, scale=0.5 + slot + sl)
    return w


def token_slots(pattern: str, n: int, rng: random.Random) -> list[int]:
    return {
        "uniform": [i % 4 for i in range(n)],  # every slot of the range the same count: in place
        "uneven": [rng.choice([0, 0, 0, 2, 3, -1]) for _ in range(n)],  # padded, with gaps
        "one long": ([0, 4, -1] + [2] * n)[:n],  # one long segment over a range of 5 slots: grouped
        "sparse": [[0, 0, 7, -1][i % 4] for i in range(n)],  # two slots far apart: their weights are copied
        "base only": [-1] * n,
    }[pattern]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("widths", [[48], [64, 16, 16]], ids=["one", "qkv"])
@pytest.mark.parametrize("pattern", ["uniform", "uneven", "one long", "sparse", "base only"])
@pytest.mark.parametrize("in_place", [True, False], ids=["sorted", "gathered"])
@pytest.mark.parametrize("tokens", [1, 12, 300])
def test_batched_equals_per_adapter(dtype, widths, pattern, in_place, tokens):
    rng = random.Random(tokens)
    d_in = 40
    w = make_weights(widths, d_in, num_slots=8, ranks=[8, 3, 16, 1, 0, 4, 4, 2], dtype=dtype)
    slots = token_slots(pattern, tokens, rng)
    if in_place:
        slots.sort()
        seg = lora_ops.sorted_segments(slots, "cpu")
    else:
        rng.shuffle(slots)
        seg = lora_ops.segment_tokens(torch.tensor(slots))
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, d_in, generator=gen).to(dtype)
    y = torch.randn(tokens, sum(widths), generator=gen).to(dtype)
    ops = lora_ops.LoRAOps("torch", "cpu")
    rows = ops.rows(seg)
    if seg is None:
        assert pattern == "base only" and rows is None
        return
    if tokens == 300:  # each layout is exercised
        lay = rows.layout
        kind = "grouped" if lay.width == 0 else "in place" if lay.pad_pos is None else "padded"
        kind += " copied" if lay.gather is not None else ""
        assert (
            kind
            == {"uniform": "in place", "uneven": "padded", "one long": "grouped", "sparse": "padded copied"}[pattern]
        )
    got, want = y.clone(), y.clone()
    ops.add(got, x, w, rows)
    lora_ops.LoRAOps._add_per_adapter(want, x, w, seg)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    base = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base], y[base])  # tokens without an adapter are left alone


def test_per_adapter_reference_is_the_math():
    """The per-adapter formulation is y += scale * (x @ A.T) @ B.T token by token."""
    w = make_weights([24], 16, num_slots=3, ranks=[4, 2, 8], dtype=torch.float32)
    slots = [2, -1, 0, 2, 1]
    x, y = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(5, 24)
    lora_ops.LoRAOps._add_per_adapter(y, x, w, lora_ops.segment_tokens(torch.tensor(slots)))
    for tok, slot in enumerate(slots):
        r = w.ranks[0][slot] if slot >= 0 else 0
        want = w.scales[0][slot] * (x[tok] @ w.a[0, slot, :r].T) @ w.b[slot, :, :r].T if r else torch.zeros(24)
        torch.testing.assert_close(y[tok], want.to(y.dtype))


def layer(is_output=False) -> LoRALinear:
    ctx = LoRAContext(lora_ops.LoRAOps("torch", "cpu"))
    lin = LoRALinear(torch.nn.Linear(8, 6), ctx, "model.layers.0.q_proj", is_output=is_output)
    lin.allocate(num_slots=2, max_rank=4)
    lin.set_slot(0, torch.randn(4, 8), torch.randn(6, 4), 2.0)
    return lin


def test_layer_refuses_a_token_count_its_step_does_not_have():
    lin = layer()
    seg = lin.ctx.ops.rows(lora_ops.sorted_segments([-1, 0, 0], "cpu"))
    lin.ctx.step = LoRAStep(seg, None, num_tokens=3, num_last=1)
    assert lin(torch.randn(1, 3, 8)).shape == (1, 3, 6)
    with pytest.raises(RuntimeError, match="q_proj got 1 tokens; the step has 3"):
        lin(torch.randn(1, 1, 8))
    head = layer(is_output=True)  # the output layer sees each sequence's last token only
    head.ctx.step = LoRAStep(None, None, num_tokens=3, num_last=1)
    assert head(torch.randn(1, 1, 8)).shape == (1, 1, 6)
    with pytest.raises(RuntimeError, match="got 3 tokens; the step has 1"):
        head(torch.randn(1, 3, 8))


def test_layer_refuses_to_run_outside_a_step():
    with pytest.raises(RuntimeError, match="outside an engine step"):
        layer()(torch.randn(2, 8))
