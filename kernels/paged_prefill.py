"""paged_prefill_attention: the queries of several prefill chunks (varlen, concatenated) against a paged K/V cache.

q [T, Hq, D] holds chunk b's queries in rows q_starts[b] .. q_starts[b] + q_lens[b] - 1; every chunk's keys, its
own new ones included, are already in k_cache, v_cache [num_blocks, block_size, Hkv, D], block_tables[b] listing
its blocks in order. Query i of chunk b sits at position kv_lens[b] - q_lens[b] + i and sees the positions up to
its own (the last `window` of them when window > 0). Optional: softcap (Gemma-2), one sink logit per query head.

One program per (query tile, kv head, chunk) handles the whole GQA group: a tile's BLOCK_M rows are
BLOCK_M // group queries times their group of heads (row r: query r // group, head r % group), so each K/V
tile is read once per kv head and any group size fits without padding heads. Keys are gathered token by token
through the block table (a tile of BLOCK_N keys may span blocks of any size) from the tile's first query's
window start to its last query's position: key tiles past the causal limit or before the window are never
visited and table entries outside that range never read. Online softmax in fp32; rows that have seen no key
yet (windows of a tile's first queries) keep m = -inf and subtract 0 instead.
"""

import torch
import triton
import triton.language as tl

from kernels.lora_shrink import dot_options
from kernels.paged_attention import NO_WINDOW, kv_tile


@triton.jit(do_not_specialize=["stride_bt"])
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,  # q, out [T, Hq, D]; k, v [num_blocks, block_size, Hkv, D]
    block_table_ptr, q_start_ptr, q_len_ptr, kv_len_ptr, sink_ptr,  # [B, max_blocks] i32; [B] i32 x 3; [Hq] fp32
    scale, softcap, window, block_size, group, head_dim,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_bt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SINKS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the last tiles (the most keys) start first
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(q_start_ptr + b)
    q_len = tl.load(q_len_ptr + b)
    ctx = tl.load(kv_len_ptr + b) - q_len  # query i of the chunk sits at position ctx + i
    tile_q = BLOCK_M // group
    t0 = tile * tile_q
    lo = tl.maximum(ctx + t0 - window + 1, 0)  # the tile's first query's window start
    hi = tl.where(t0 < q_len, ctx + tl.minimum(t0 + tile_q, q_len), 0)  # past its last query; 0: no query here

    offs_m = tl.arange(0, BLOCK_M)
    tok = t0 + offs_m // group
    heads = kvh * group + offs_m % group
    m_mask = (offs_m < tile_q * group) & (tok < q_len)
    qpos = ctx + tok
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    rows = (q_start + tok).to(tl.int64)
    q_ptrs = q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]
    if UPCAST:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_table_ptr + b.to(tl.int64) * stride_bt
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    den = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        pos = n0 + offs_n
        valid = (pos >= lo) & (pos < hi)
        k, v = kv_tile(
            table, k_base, v_base, pos, valid, offs_d, d_mask, block_size,
            stride_kb, stride_kt, stride_vb, stride_vt, UPCAST,
        )  # fmt: skip
        s = tl.dot(q, k, input_precision=PRECISION) * scale  # [BM, BN]
        if softcap > 0:
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # softcap * tanh(s / softcap)
        seen = valid[None, :] & (pos[None, :] <= qpos[:, None]) & (pos[None, :] > qpos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_sub)
        p = tl.exp(s - m_sub[:, None])
        den = den * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        p = p.to(v_ptr.dtype.element_ty)  # P @ V in the cache's dtype, as on the GPU
        if UPCAST:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new

    if HAS_SINKS:
        sink = tl.load(sink_ptr + heads, mask=m_mask, other=0.0)
        m_new = tl.maximum(m, sink)
        alpha = tl.exp(m - m_new)
        den = den * alpha + tl.exp(sink - m_new)
        acc = acc * alpha[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    out = acc / tl.where(m_mask, den, 1.0)[:, None]  # padding rows saw no key
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# BLOCK_D -> (BLOCK_M, BLOCK_N): tiles that compile for sm_80 and sm_90 with 4 warps and no stack frame (kernels.aot;
# the gathered K/V tiles' pointers take registers too): half types spill at 64 x 32 for BLOCK_D 64, 128 x 32 for
# 128, 64 x 16 for 256. fp32's dots run on FMAs: smaller tiles. Chosen on register counts, not timed on a GPU.
HALF_TILES = {16: (64, 64), 32: (128, 32), 64: (128, 16), 128: (64, 32), 256: (32, 16)}
FP32_TILES = {16: (64, 32), 32: (32, 32), 64: (32, 32), 128: (32, 16), 256: (16, 16)}


def prefill_config(head_dim: int, group: int, dtype=torch.float16, interpreter: bool = False) -> dict:
    """Tiles: tl.dot needs >= 16 per side; BLOCK_M rows hold at least one query's whole group of heads.
    Under the interpreter (a CPU) every loop step and program costs: big tiles."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    min_m = max(16, triton.next_power_of_2(group))
    if interpreter:
        return dict(BLOCK_M=max(128, min_m), BLOCK_N=128, BLOCK_D=block_d)
    assert block_d <= 256, f"head dim {head_dim}: no tiles chosen past 256"
    block_m, block_n = (FP32_TILES if dtype == torch.float32 else HALF_TILES)[block_d]
    return dict(BLOCK_M=max(block_m, min_m), BLOCK_N=block_n, BLOCK_D=block_d)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    q_starts: torch.Tensor,  # [B] int32, first row of each chunk in q
    q_lens: torch.Tensor,  # [B] int32, queries of each chunk
    kv_lens: torch.Tensor,  # [B] int32, keys of each sequence, the chunk's own included (>= q_lens)
    scale: float,
    softcap: float = 0.0,  # > 0: scores = softcap * tanh(scores / softcap)
    window: int = 0,  # > 0: only the last `window` positions, the query's own included
    sinks: torch.Tensor | None = None,  # [Hq] fp32: one more logit per head in the softmax, no value
    max_q_len: int | None = None,  # the longest chunk, when the caller knows it; else read from q_lens (a sync)
    config: dict | None = None,
) -> torch.Tensor:
    """-> out [T, Hq, D] in q's dtype; rows of q in no chunk are left uninitialized.
    Grid: cdiv(max_q_len, BLOCK_M // group) query tiles x Hkv x B; tiles past a chunk's queries do nothing."""
    assert q.ndim == 3 and k_cache.ndim == 4 and k_cache.shape == v_cache.shape, (q.shape, k_cache.shape)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0, (q.shape, k_cache.shape)
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1
    batch = block_tables.shape[0]
    assert block_tables.ndim == 2 and block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    for lens in (q_starts, q_lens, kv_lens):
        assert lens.shape == (batch,) and lens.dtype == torch.int32 and lens.is_contiguous(), (lens.shape, lens.dtype)
    assert sinks is None or (sinks.shape == (num_heads,) and sinks.dtype == torch.float32 and sinks.stride(0) == 1)
    group = num_heads // num_kv_heads
    cfg = config or prefill_config(head_dim, group, q.dtype, interpreter=q.device.type == "cpu")
    assert cfg["BLOCK_M"] >= group, (cfg, group)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if max_q_len is None:
        max_q_len = int(q_lens.max()) if batch else 0
    if batch == 0 or max_q_len == 0:
        return out
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    tiles = triton.cdiv(max_q_len, cfg["BLOCK_M"] // group)
    _paged_prefill_kernel[(tiles, num_kv_heads, batch)](
        q, k_cache, v_cache, out, block_tables, q_starts, q_lens, kv_lens, dummy if sinks is None else sinks,
        scale, softcap, window if window > 0 else NO_WINDOW, block_size, group, head_dim,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), block_tables.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], HAS_SINKS=sinks is not None,
        **dot_options(q.dtype, q.device),
    )  # fmt: skip
    return out


def paged_prefill_reference(
    q, k_cache, v_cache, block_tables, q_starts, q_lens, kv_lens, scale, softcap=0.0, window=0, sinks=None
) -> torch.Tensor:
    """Plain torch, chunk by chunk: gather positions [lo, kv_len) through the block table (lo: the chunk's first
    query's window start, or 0), mask per query, fp32. Rows of q in no chunk come back as zeros."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1:3]
    out = torch.zeros_like(q)
    for b, (start, q_len, kv_len) in enumerate(zip(q_starts.tolist(), q_lens.tolist(), kv_lens.tolist())):
        if q_len == 0:
            continue
        qpos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        pos = torch.arange(max(kv_len - q_len - window + 1, 0) if window > 0 else 0, kv_len, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("ihd,nhd->hin", q[start : start + q_len].float(), k) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        mask = pos[None, :] <= qpos[:, None]
        if window > 0:
            mask &= pos[None, :] > qpos[:, None] - window
        scores = scores.masked_fill(~mask, float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks.float()[:, None, None].expand(-1, q_len, 1)], dim=2)
        probs = torch.softmax(scores, dim=2)[:, :, : len(pos)]
        out[start : start + q_len] = torch.einsum("hin,nhd->ihd", probs, v).to(q.dtype)
    return out
