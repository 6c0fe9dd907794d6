"""paged_prefill_attention against its torch reference: compiled on a GPU, under the Triton interpreter without one
(this machine, CI).

Grid: dtype x head dim (32, 64, 80: not a power of two, 128) x GQA group (1, 4) x window (0, 20) x softcap (0, 30)
x sinks (none, random) x tiles (the launcher's own; a GPU's), each on one batch of chunks of mixed lengths (1, 17,
45, 70: multiples of no tile) after cached prefixes of 0 to 4 blocks and a few slots, whose blocks are shuffled and
not contiguous; the chunks lie in q out of order with rows of no chunk between them, q a view into a fused qkv
tensor, K and V halves of one cache. The default run takes a representative set (every value of every axis at
least once); the full product is marked slow. Rows of q in no chunk, unused blocks, slots past each sequence's
end and positions before its first query's window are NaN, and so are the blocks that table entries past each
sequence (and before its window) point to: a kernel that reads them fails.
"""

import itertools
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

from backend.model.attention import AttnArgs, attend  # noqa: E402
from kernels.paged_prefill import (  # noqa: E402
    paged_prefill_attention,
    paged_prefill_reference,
    prefill_config,
)

# dtype -> (atol, rtol) against the reference (fp32 math, rounded once at the end)
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}
HEAD_DIMS = [32, 64, 80, 128]
GROUPS = [1, 4]
NUM_KV_HEADS = 2
WINDOWS = [0, 20]
SOFTCAPS = [0.0, 30.0]
CONFIGS = ["default", "gpu"]  # the launcher's own tiles; the tiles it picks on a GPU
# (queries, cached keys) per chunk, block size 16: prefixes of 0, a few slots, 2 blocks + 5, 3 blocks, 4 blocks
CHUNKS = [(45, 0), (1, 48), (70, 37), (17, 64), (30, 3)]


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float16
    head_dim: int = 64
    group: int = 4
    window: int = 0
    softcap: float = 0.0
    sinks: bool = False
    block_size: int = 16

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (
            f"{dt}-d{self.head_dim}-g{self.group}-w{self.window}-sc{self.softcap:g}-sinks{int(self.sinks)}"
            f"-bs{self.block_size}"
        )


def build(case: Case, chunks=CHUNKS, seed: int = 0, pad_ids: str = "nan"):
    """-> (args, kwargs) of paged_prefill_attention. pad_ids: what table entries that must not be read hold: ids of
    NaN blocks ("nan"), or ids out of range (-1, 2**31 - 1)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_heads, d, bs, window = NUM_KV_HEADS * case.group, case.head_dim, case.block_size, case.window
    q_lens = [n for n, _ in chunks]
    kv_lens = [n + c for n, c in chunks]
    max_blocks = max(-(-n // bs) for n in kv_lens) + 2
    used = sum(-(-n // bs) for n in kv_lens)
    num_blocks = used + 7  # some never used
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    nan_blocks = ids[used:]

    kv = torch.randn(2, num_blocks, bs, NUM_KV_HEADS, d, generator=gen)
    kv[:, nan_blocks] = float("nan")
    table = torch.empty(len(chunks), max_blocks, dtype=torch.int32)
    for b, (n, c) in enumerate(zip(kv_lens, [c for _, c in chunks])):
        k = -(-n // bs)
        blocks, ids = ids[:k], ids[k:]
        lo = max(c - window + 1, 0) if window else 0  # the chunk's first query's window start
        row = [rng.choice(nan_blocks) for _ in range(max_blocks)]
        if pad_ids != "nan":
            row = [[-1, 2**31 - 1][i % 2] for i in range(max_blocks)]
        row[lo // bs : len(blocks)] = blocks[lo // bs :]
        table[b] = torch.tensor(row, dtype=torch.int32)
        for p in [*range(lo // bs * bs, lo), *range(n, len(blocks) * bs)]:  # before the window, past the end
            kv[:, blocks[p // bs], p % bs] = float("nan")

    order = list(range(len(chunks)))
    rng.shuffle(order)
    q_starts, row = [0] * len(chunks), 3  # rows 0..2 and 2 rows between chunks belong to none
    for b in order:
        q_starts[b], row = row, row + q_lens[b] + 2
    qkv = torch.randn(row, num_heads + 2 * NUM_KV_HEADS, d, generator=gen)
    in_chunk = torch.zeros(row, dtype=torch.bool)
    for s, n in zip(q_starts, q_lens):
        in_chunk[s : s + n] = True
    qkv[~in_chunk] = float("nan")
    kw = dict(softcap=case.softcap, window=window)
    if case.sinks:
        kw["sinks"] = (torch.randn(num_heads, generator=gen) + 1.0).to(DEVICE)
    kv, qkv = kv.to(case.dtype).to(DEVICE), qkv.to(case.dtype).to(DEVICE)
    lens = [torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in (q_starts, q_lens, kv_lens)]
    return (qkv[:, :num_heads], kv[0], kv[1], table.to(DEVICE), *lens, d**-0.5), kw


def config_for(name: str, q, k_cache) -> dict | None:
    if name == "default":
        return None
    return prefill_config(q.shape[2], q.shape[1] // k_cache.shape[2], q.dtype)


def chunk_rows(q_starts, q_lens) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + n) for s, n in zip(q_starts.tolist(), q_lens.tolist())]).to(DEVICE)


def check(case: Case, configs: str = "default", **kw) -> None:
    args, features = build(case, **kw)
    q = args[0]
    out = paged_prefill_attention(*args, **features, config=config_for(configs, q, args[1]))
    ref = paged_prefill_reference(*args, **features)
    assert out.dtype == q.dtype and out.shape == q.shape
    rows = chunk_rows(args[4], args[5])
    out, ref = out[rows], ref[rows]
    assert not out.isnan().any(), "read a row of no chunk, an unused block, a slot past a sequence or before a window"
    atol, rtol = TOLERANCE[case.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def representative() -> list[Case]:
    """Every value of every axis at least once, around a middle case, plus a few hard mixes."""
    base = Case()
    cases = [base]
    axes = {
        "dtype": list(TOLERANCE),
        "head_dim": HEAD_DIMS,
        "group": GROUPS,
        "window": WINDOWS,
        "softcap": SOFTCAPS,
        "sinks": [False, True],
    }
    for axis, values in axes.items():
        cases += [replace(base, **{axis: v}) for v in values if v != getattr(base, axis)]
    cases += [
        Case(torch.bfloat16, 80, 4, 20, 30.0, True),
        Case(torch.float32, 128, 1, 20, 30.0, True),
        Case(torch.float16, 32, 1, 20, 0.0, True),
        Case(torch.bfloat16, 128, 4, 0, 30.0, False),
    ]
    return list(dict.fromkeys(cases))


def full_grid() -> list[Case]:
    product = itertools.product(TOLERANCE, HEAD_DIMS, GROUPS, WINDOWS, SOFTCAPS, [False, True])
    return [c for c in (Case(*values) for values in product) if c not in set(representative())]


@pytest.mark.parametrize("configs", CONFIGS)
@pytest.mark.parametrize("case", representative(), ids=str)
def test_matches_reference(case, configs):
    check(case, configs)


@pytest.mark.slow
@pytest.mark.parametrize("configs", CONFIGS)
@pytest.mark.parametrize("case", full_grid(), ids=str)
def test_matches_reference_full_grid(case, configs):
    check(case, configs)


@pytest.mark.parametrize("window", [0, 20])
def test_never_dereferences_table_entries_it_must_not_read(window):
    """Entries past each sequence and before its first query's window hold -1 and 2**31 - 1: no address may come
    from them."""
    check(Case(torch.float16, 64, 4, window, 30.0, True), "gpu", pad_ids="out of range")


@pytest.mark.parametrize("group", [3, 8, 16])
def test_other_groups(group):
    """Groups that leave rows of a tile unused (3: 42 queries in 126 of 128 rows), and a group of 16 heads."""
    check(Case(torch.float16, 64, group, 20, 0.0, True), "gpu")


@pytest.mark.parametrize("block_size", [8, 32, 64])
def test_block_sizes(block_size):
    check(Case(torch.float16, 64, 4, 20, 30.0, True, block_size), "gpu")


@pytest.mark.parametrize("window", [0, 7, 200])
def test_long_chunk_after_a_long_prefix(window):
    """A 300-query chunk after 250 cached keys beside a short one: many query and key tiles, skipped by the causal
    limit and the window (7: under a tile; 200: across tiles)."""
    check(Case(torch.bfloat16, 64, 4, window, 0.0, True), "gpu", chunks=[(300, 250), (5, 11)])


def test_empty_chunks_and_empty_batch():
    """Chunks of no query (max_q_len given) write nothing; no chunk at all returns at once."""
    args, kw = build(Case(torch.float32, 32, 4), chunks=[(0, 16), (9, 5), (0, 0)])
    out = paged_prefill_attention(*args, **kw, max_q_len=9)
    ref = paged_prefill_reference(*args, **kw)
    rows = chunk_rows(args[4], args[5])
    torch.testing.assert_close(out[rows], ref[rows], atol=2e-5, rtol=2e-5)
    q, k = args[0], args[1]
    none = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    table = torch.zeros(0, 4, dtype=torch.int32, device=DEVICE)
    assert paged_prefill_attention(q[:0], k, k, table, none, none, none, 0.125).shape == (0, *q.shape[1:])


def test_softcap_changes_the_output():
    """At softcap 2 the tanh bites (scores of a few units): the kernel follows the reference, not plain scores."""
    args, _ = build(Case(torch.float32, 64, 4))
    args = (args[0] * 4, *args[1:])
    rows = chunk_rows(args[4], args[5])
    out = paged_prefill_attention(*args, softcap=2.0)[rows]
    torch.testing.assert_close(out, paged_prefill_reference(*args, softcap=2.0)[rows], atol=2e-5, rtol=2e-5)
    plain = paged_prefill_reference(*args)[rows]
    assert (out - plain).abs().max() > 0.1


@pytest.mark.parametrize("case", [Case(torch.float32, 64, 4, 20, 30.0, True), Case(torch.float32, 80, 1, 0, 0.0)])
def test_reference_is_backend_attend(case):
    """The reference's semantics are backend.model.attention.attend's: each chunk against its keys gathered in order."""
    args, kw = build(case, chunks=[(45, 0), (17, 64), (30, 3)])
    q, k_cache, v_cache, table, q_starts, q_lens, kv_lens, scale = args
    ref = paged_prefill_reference(*args, **kw)
    bs = k_cache.shape[1]
    attn = AttnArgs(scale, case.softcap, case.window, kw.get("sinks"))
    for b, (s, n, kv_len) in enumerate(zip(q_starts.tolist(), q_lens.tolist(), kv_lens.tolist())):
        pos = torch.arange(kv_len, device=DEVICE)
        blocks = table[b, pos // bs].long()
        k, v = (c[blocks, pos % bs].nan_to_num(0.0).transpose(0, 1)[None] for c in (k_cache, v_cache))
        want = attend(q[s : s + n].transpose(0, 1)[None], k, v, attn, kv_len - n)[0].transpose(0, 1)
        torch.testing.assert_close(ref[s : s + n], want, atol=1e-5, rtol=1e-5)


@pytest.mark.heavy
def test_every_variant_compiles_to_cubin_for_sm80_and_sm90():
    """triton.compile(..., target=GPUTarget("cuda", 80 | 90, 32)) on this GPU-less machine, in a process of its own
    (this one runs the interpreter); no variant may spill (stack frame or local memory). Heavy: 60 compilations,
    about a minute and a half on 2 cores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "kernels.aot", "paged_prefill"], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    compiled, total = map(int, re.search(r"(\d+) / (\d+) variants compiled", done.stdout).groups())
    assert compiled == total > 0
    assert {"sm_80", "sm_90"} <= set(re.findall(r"sm_\d+", done.stdout))
    for dt, d, sinks in itertools.product(["fp32", "fp16", "bf16"], [32, 64, 128, 256], [False, True]):
        assert re.search(rf"paged_prefill +{dt} sm_90 .*BLOCK_D={d} HAS_SINKS={sinks}", done.stdout), (dt, d, sinks)
