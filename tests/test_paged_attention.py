"""paged_decode_attention against its torch reference: compiled on a GPU, under the Triton interpreter without one
(this machine, CI).

Grid: dtype x heads (MHA, GQA, MQA) x head dim (64, 96: not a power of two) x block size x features (plain,
softcap, sliding window, sinks, all three), each on one batch of mixed lengths (1, 2, 17, 300, a block boundary)
whose blocks are shuffled and not contiguous, q a view into a fused qkv tensor, K and V halves of one cache.
The default run takes a representative set (every value of every axis at least once); the full product is
marked slow. Unused blocks, slots past each sequence's end and positions before its window are NaN, and so
are the blocks that table entries past each sequence (and before its window) point to: a kernel that reads
them fails.
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

from kernels.paged_attention import (  # noqa: E402
    MAX_SPLITS,
    decode_config,
    paged_decode_attention,
    paged_decode_attention_ref,
)

# dtype -> (atol, rtol) against the reference (fp32 math, rounded once at the end)
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}  # Hq, Hkv
HEAD_DIMS = [64, 96]
BLOCK_SIZES = [16, 32]
FEATURES = {
    "plain": {},
    "softcap": dict(softcap=50.0),
    "window": dict(window=7),
    "sinks": dict(sinks=True),
    "all": dict(softcap=50.0, window=7, sinks=True),
}
CONFIGS = ["default", "gpu", "split"]  # the launcher's own choice; a GPU's tiles in one pass; in 3 splits


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float16
    heads: str = "gqa"
    head_dim: int = 64
    block_size: int = 16
    features: str = "plain"

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{dt}-{self.heads}-d{self.head_dim}-bs{self.block_size}-{self.features}"


def build(case: Case, seed: int = 0, pad_ids: str = "nan"):
    """-> (q, k_cache, v_cache, block_tables, seq_lens, scale, kwargs). pad_ids: what table entries that must not
    be read hold: ids of NaN blocks ("nan"), or ids out of range (-1, 2**31 - 1)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_heads, num_kv_heads = HEADS[case.heads]
    d, bs = case.head_dim, case.block_size
    kw = dict(FEATURES[case.features])
    seq_lens = [1, 2, 17, 300, 2 * bs]
    rng.shuffle(seq_lens)
    window = kw.get("window", 0)
    max_blocks = max(-(-n // bs) for n in seq_lens) + 2
    used = sum(-(-n // bs) for n in seq_lens)
    num_blocks = used + 7  # some never used
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    nan_blocks = ids[used:]

    kv = torch.randn(2, num_blocks, bs, num_kv_heads, d, generator=gen)
    kv[:, nan_blocks] = float("nan")
    table = torch.empty(len(seq_lens), max_blocks, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        k = -(-n // bs)
        blocks, ids = ids[:k], ids[k:]
        lo = max(n - window, 0) if window else 0
        row = [rng.choice(nan_blocks) for _ in range(max_blocks)]
        if pad_ids != "nan":
            row = [[-1, 2**31 - 1][i % 2] for i in range(max_blocks)]
        row[lo // bs : len(blocks)] = blocks[lo // bs :]
        table[b] = torch.tensor(row, dtype=torch.int32)
        for p in [*range(lo // bs * bs, lo), *range(n, len(blocks) * bs)]:  # before the window, past the end
            kv[:, blocks[p // bs], p % bs] = float("nan")

    qkv = torch.randn(len(seq_lens), num_heads + 2 * num_kv_heads, d, generator=gen)
    if kw.get("sinks"):
        kw["sinks"] = (torch.randn(num_heads, generator=gen) + 1.0).to(DEVICE)
    kv, qkv = kv.to(case.dtype).to(DEVICE), qkv.to(case.dtype).to(DEVICE)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return qkv[:, :num_heads], kv[0], kv[1], table.to(DEVICE), seq_lens, d**-0.5, kw


def config_for(name: str, q, k_cache, block_tables) -> dict | None:
    if name == "default":
        return None
    batch, num_heads, d = q.shape
    _, bs, num_kv_heads, _ = k_cache.shape
    cfg = decode_config(batch, num_kv_heads, num_heads // num_kv_heads, d, block_tables.shape[1] * bs, q.dtype)
    return {**cfg, "NUM_SPLITS": 1 if name == "gpu" else 3}


def check(case: Case, configs: str = "default", **kw) -> None:
    q, k, v, table, seq_lens, scale, features = build(case, **kw)
    out = paged_decode_attention(q, k, v, table, seq_lens, scale, config=config_for(configs, q, k, table), **features)
    ref = paged_decode_attention_ref(q, k, v, table, seq_lens, scale, **features)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any(), "read an unused block, a slot past a sequence or a position before its window"
    atol, rtol = TOLERANCE[case.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def representative() -> list[Case]:
    """Every value of every axis at least once, around a middle case, plus a few hard mixes."""
    base = Case()
    cases = [base]
    axes = {
        "dtype": list(TOLERANCE),
        "heads": list(HEADS),
        "head_dim": HEAD_DIMS,
        "block_size": BLOCK_SIZES,
        "features": list(FEATURES),
    }
    for axis, values in axes.items():
        cases += [replace(base, **{axis: v}) for v in values if v != getattr(base, axis)]
    cases += [
        Case(torch.bfloat16, "mqa", 96, 32, "all"),
        Case(torch.float32, "gqa", 96, 16, "all"),
        Case(torch.float16, "mha", 96, 32, "window"),
        Case(torch.bfloat16, "gqa", 64, 16, "sinks"),
    ]
    return list(dict.fromkeys(cases))


def full_grid() -> list[Case]:
    product = itertools.product(TOLERANCE, HEADS, HEAD_DIMS, BLOCK_SIZES, FEATURES)
    return [c for c in (Case(*values) for values in product) if c not in set(representative())]


@pytest.mark.parametrize("configs", CONFIGS)
@pytest.mark.parametrize("case", representative(), ids=str)
def test_matches_reference(case, configs):
    check(case, configs)


@pytest.mark.slow
@pytest.mark.parametrize("configs", ["default", "split"])
@pytest.mark.parametrize("case", full_grid(), ids=str)
def test_matches_reference_full_grid(case, configs):
    check(case, configs)


@pytest.mark.parametrize("configs", ["default", "split"])
@pytest.mark.parametrize("features", ["plain", "all"])
def test_never_dereferences_table_entries_it_must_not_read(features, configs):
    """Entries past each sequence and before its window hold -1 and 2**31 - 1: no address may come from them."""
    check(Case(torch.float16, "gqa", 64, 16, features), configs, pad_ids="out of range")


@pytest.mark.parametrize("block_size", [8, 64, 128])
def test_block_sizes(block_size):
    check(Case(torch.float16, "gqa", 64, block_size, "all"), "gpu")


@pytest.mark.parametrize("splits", [2, 8])
def test_splits_give_the_same_output(splits):
    """The merge of splits (some empty: past short sequences, before windows) equals one pass, in fp32."""
    q, k, v, table, seq_lens, scale, kw = build(Case(torch.float32, "gqa", 96, 16, "all"))
    cfg = config_for("gpu", q, k, table)
    one = paged_decode_attention(q, k, v, table, seq_lens, scale, config=cfg, **kw)
    many = paged_decode_attention(q, k, v, table, seq_lens, scale, config={**cfg, "NUM_SPLITS": splits}, **kw)
    torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)


def test_softcap_changes_the_output():
    """At softcap 2 the tanh bites (scores of a few units): the kernel follows the reference, not plain scores."""
    q, k, v, table, seq_lens, scale, _ = build(Case(torch.float32, "gqa", 64, 16))
    q = q * 4
    out = paged_decode_attention(q, k, v, table, seq_lens, scale, softcap=2.0)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k, v, table, seq_lens, scale, softcap=2.0))
    plain = paged_decode_attention_ref(q, k, v, table, seq_lens, scale)
    assert (out - plain).abs().max() > 0.1


def test_decode_config_splits_only_long_contexts_with_few_programs():
    assert decode_config(128, 8, 4, 128, 32768)["NUM_SPLITS"] == 1  # 1024 programs already
    assert decode_config(1, 8, 4, 128, 256)["NUM_SPLITS"] == 1  # too short to split
    assert decode_config(1, 8, 4, 128, 4096)["NUM_SPLITS"] == 16  # 256-token splits
    assert decode_config(1, 1, 4, 128, 1 << 20)["NUM_SPLITS"] == MAX_SPLITS
    cfg = decode_config(1, 8, 4, 96, 32768, torch.bfloat16)
    assert cfg["BLOCK_G"] == 16 and cfg["BLOCK_D"] == 128 and cfg["BLOCK_N"] >= 16 and cfg["NUM_SPLITS"] > 1


def test_long_context_in_the_splits_a_gpu_would_pick():
    """One 3000-token sequence (with a GQA group) under decode_config's own GPU split count."""
    gen = torch.Generator().manual_seed(1)
    bs, n, num_blocks = 16, 3000, 200
    k, v = (torch.randn(num_blocks, bs, 2, 64, generator=gen).half().to(DEVICE) for _ in range(2))
    table = torch.randperm(num_blocks, generator=gen)[None, : -(-n // bs)].to(torch.int32).to(DEVICE)
    q = torch.randn(1, 8, 64, generator=gen).half().to(DEVICE)
    seq_lens = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    cfg = decode_config(1, 2, 4, 64, table.shape[1] * bs, torch.float16)
    assert cfg["NUM_SPLITS"] > 1
    out = paged_decode_attention(q, k, v, table, seq_lens, 0.125, config=cfg)
    ref = paged_decode_attention_ref(q, k, v, table, seq_lens, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-3, rtol=3e-3)


def test_empty_batch():
    q = torch.empty(0, 4, 64, dtype=torch.float16, device=DEVICE)
    k = torch.zeros(4, 16, 2, 64, dtype=torch.float16, device=DEVICE)
    table = torch.zeros(0, 4, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    assert paged_decode_attention(q, k, k, table, seq_lens, 0.125).shape == (0, 4, 64)


def test_every_variant_compiles_to_cubin_for_sm80_and_sm90():
    """triton.compile(..., target=GPUTarget("cuda", 80 | 90, 32)) on this GPU-less machine, in a process of its own
    (this one runs the interpreter); no variant may spill (stack frame or local memory)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "kernels.aot", "paged_decode", "paged_reduce"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    compiled, total = map(int, re.search(r"(\d+) / (\d+) variants compiled", done.stdout).groups())
    assert compiled == total > 0
    assert {"sm_80", "sm_90"} <= set(re.findall(r"sm_\d+", done.stdout))
    assert {"paged_decode", "paged_reduce"} <= set(re.findall(r"^(\w+)", done.stdout, re.M))
    for dt, d in itertools.product(["fp32", "fp16", "bf16"], [64, 128, 256]):
        assert re.search(rf"paged_decode +{dt} sm_90 .*BLOCK_D={d} .*SPLIT=True", done.stdout), (dt, d)
