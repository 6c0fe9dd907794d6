"""dora_scale against its torch reference: compiled on a GPU, under the Triton interpreter without one.

dtype x tokens x N (odd) x slot pattern x token order. Tokens of other slots and of no slot, and columns
with g = 1 and c = 0, must keep their bits; non-DoRA slots' g and c are NaN, so applying them fails.
"""

import os
import random
import re
import subprocess
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

from kernels.dora_scale import dora_config, dora_scale, dora_scale_ref  # noqa: E402
from kernels.segments import segment_tokens, sorted_segments  # noqa: E402

DTYPES = [  # dtype, atol, rtol: a GPU may fuse y * g + c into one FMA, the reference rounds twice
    (torch.float32, 1e-6, 1e-6),
    (torch.float16, 1e-3, 2e-3),
    (torch.bfloat16, 1e-2, 1.6e-2),
]
PATTERNS = {  # slots of the tokens, DoRA slots; -1 = no adapter
    "one": ([2], {2}),
    "some": ([0, 1, 3], {0, 3}),
    "base": ([3, -1, 0, 1], {1, 3}),  # one token: slot 3
}
NUM_SLOTS = 4
PAD = 8  # y is a column slice of a wider buffer: a row stride other than N


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


def build(dtype, tokens: int, n: int, pattern: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    slots, dora_slots = PATTERNS[pattern]
    token_slots = [slots[i % len(slots)] for i in range(tokens)]
    rng.shuffle(token_slots)
    g = torch.full((NUM_SLOTS, n), float("nan"))
    c = torch.full((NUM_SLOTS, n), float("nan"))
    identity = torch.rand(n, generator=gen) < 0.2
    for s in dora_slots:
        g[s] = torch.where(identity, 1.0, 1 + 0.1 * torch.randn(n, generator=gen))
        c[s] = torch.where(identity, 0.0, 0.1 * torch.randn(n, generator=gen))
    dora = torch.tensor([int(s in dora_slots) for s in range(NUM_SLOTS)], dtype=torch.int32)
    buf = torch.randn(tokens, PAD + n, generator=gen).to(dtype)
    buf[torch.rand(buf.shape, generator=gen) < 0.05] = -0.0  # y * 1 + 0 would make these +0.0
    return buf.to(DEVICE), g.to(DEVICE), c.to(DEVICE), dora.to(DEVICE), token_slots, identity.to(DEVICE)


def check(dtype, atol, rtol, tokens, n, pattern, order="shuffled", config=None):
    buf, g, c, dora, token_slots, identity = build(dtype, tokens, n, pattern)
    if order == "sorted":
        token_slots.sort()
        seg = sorted_segments(token_slots, DEVICE)
    token_slots = torch.tensor(token_slots, dtype=torch.int32, device=DEVICE)
    if order == "shuffled":
        seg = segment_tokens(token_slots)
    y = buf.clone()[:, PAD:]
    ref = dora_scale_ref(buf[:, PAD:], g, c, dora, token_slots)
    dora_scale(y, g, c, dora, seg.sorted_tokens, seg.slots, seg.starts, seg.lens, seg.max_len, config=config)

    scaled = (token_slots >= 0) & (dora[token_slots.clamp(min=0).long()] != 0)
    assert torch.equal(bits(y[~scaled]), bits(buf[~scaled, PAD:])), "a token of no DoRA slot changed"
    assert torch.equal(bits(y[:, identity]), bits(buf[:, PAD:][:, identity])), "a g = 1, c = 0 column changed"
    assert torch.equal(bits(ref[:, identity]), bits(buf[:, PAD:][:, identity]))
    assert not y.isnan().any(), "a non-DoRA slot's g or c was applied"
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    if scaled.any():
        assert not torch.equal(y, buf[:, PAD:]), "nothing was scaled"


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("n", [96, 1000, 2049])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_dora_scale_matches_reference(dtype, atol, rtol, tokens, n, pattern):
    check(dtype, atol, rtol, tokens, n, pattern)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_dora_scale_sorted_segments(dtype, atol, rtol, pattern):
    check(dtype, atol, rtol, 7, 1000, pattern, order="sorted")


@pytest.mark.parametrize("tokens, n", [(7, 96), (40, 1000), (300, 2049)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_dora_scale_with_gpu_tiles(dtype, atol, rtol, tokens, n):
    """The tiles a GPU gets (16 x <= 256): several blocks per segment along both axes."""
    check(dtype, atol, rtol, tokens, n, "base", config=dora_config(n))


def test_no_dora_slot_is_a_no_op():
    buf, g, c, dora, token_slots, _ = build(torch.float16, 7, 96, "some")
    seg = segment_tokens(torch.tensor(token_slots, dtype=torch.int32, device=DEVICE))
    y = buf.clone()[:, PAD:]
    dora_scale(y, g, c, torch.zeros_like(dora), seg.sorted_tokens, seg.slots, seg.starts, seg.lens, seg.max_len)
    assert torch.equal(bits(y), bits(buf[:, PAD:]))


def test_config_is_a_power_of_two_tile():
    for n in [1, 16, 96, 257, 14336]:
        for interpreter in [False, True]:
            cfg = dora_config(n, interpreter)
            assert all(v & (v - 1) == 0 and v >= 16 for v in cfg.values()), (n, cfg)
    assert dora_config(14336) == {"BLOCK_M": 16, "BLOCK_N": 256}


def test_every_dora_scale_variant_compiles_to_cubin_for_sm80_and_sm90():
    """triton.compile(..., target=GPUTarget("cuda", 80 | 90, 32)) on this GPU-less machine, in a process of its own
    (this one runs the interpreter); no variant may spill (stack frame or local memory)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "kernels.aot", "dora_scale"], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    compiled, total = map(int, re.search(r"(\d+) / (\d+) variants compiled", done.stdout).groups())
    assert compiled == total > 0
    for dt in ["fp32", "fp16", "bf16"]:
        for sm in ["sm_80", "sm_90"]:
            assert re.search(rf"^dora_scale +{dt} {sm} BLOCK_M=16 BLOCK_N=256 ", done.stdout, re.M), (dt, sm)
