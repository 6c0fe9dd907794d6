"""paged_decode_attention: one query token per sequence against a paged K/V cache.

k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables[b] lists sequence b's blocks in order. The
query sits at position seq_lens[b] - 1 and sees positions [lo, seq_lens[b]) with lo = seq_lens[b] - window
(sliding window) or 0. Optional: softcap (Gemma-2), one sink logit per query head (gpt-oss).

One program per (sequence, kv head, split) handles the whole GQA group, so each K/V token is read once per
kv head: the group's query rows are padded to 16 and both products go through tl.dot (MMA on a GPU; the
padding costs compute, and decode is bound by memory, not compute). Tokens are gathered one by one through
the block table, so a tile of BLOCK_N tokens may span blocks of any size; table entries outside [lo, seq_len)
are never read. Online softmax in fp32. Long contexts with too few (sequence, kv head) programs to fill a GPU
split into NUM_SPLITS ranges of split_len tokens (flash-decoding): each writes its (max, sum, unnormalized
acc), -inf / 0 / 0 when its range holds no visible position, and _paged_reduce_kernel (one program per
query head) merges them, adds the sink and normalizes.
Reductions name tl.standard's combine functions: tl.max / tl.sum are @triton.jit helpers (see __init__), and
the interpreter runs these two combines with numpy.
"""

import torch
import triton
import triton.language as tl

from kernels.lora_shrink import dot_options

NO_WINDOW = 1 << 30  # window 0 (none) as a window no sequence reaches


# Arguments that vary with the batch are not specialized on (Triton would compile a variant for each of
# their values that is 1 or a multiple of 16): the variants are those of the configuration, which the
# engine's warm-up compiles before it serves.
@triton.jit
def kv_tile(
    table, k_base, v_base, pos, valid, offs_d, d_mask, block_size,
    stride_kb, stride_kt, stride_vb, stride_vt, UPCAST: tl.constexpr,
):  # fmt: skip
    """K [BD, BN] and V [BN, BD] at positions `pos` (where `valid`) of a sequence, through its block table."""
    blk = tl.load(table + pos // block_size, mask=valid, other=0).to(tl.int64)
    slot = pos % block_size
    k_ptrs = k_base + blk[None, :] * stride_kb + slot[None, :] * stride_kt + offs_d[:, None]
    k = tl.load(k_ptrs, mask=d_mask[:, None] & valid[None, :], other=0.0)
    v_ptrs = v_base + blk[:, None] * stride_vb + slot[:, None] * stride_vt + offs_d[None, :]
    v = tl.load(v_ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    return k, v


@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,  # q, out [B, Hq, D]; k, v [num_blocks, block_size, Hkv, D]
    acc_ptr, m_ptr, den_ptr,  # SPLIT only: acc [B, Hq, NUM_SPLITS, D], m, den [B, Hq, NUM_SPLITS] fp32
    block_table_ptr, seq_len_ptr, sink_ptr,  # [B, max_blocks] i32, [B] i32, [Hq] fp32
    scale, softcap, window, block_size, group, head_dim, split_len,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_bt,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    HAS_SINKS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_len_ptr + b)
    lo = tl.maximum(seq_len - window, 0)
    start = tl.maximum(lo // BLOCK_N * BLOCK_N, split * split_len)
    end = tl.minimum(seq_len, split * split_len + split_len)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < group
    heads = kvh * group + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BG, BD]
    if UPCAST:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_table_ptr + b.to(tl.int64) * stride_bt
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    den = tl.full((BLOCK_G,), 0.0, tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)
    for n0 in range(start, end, BLOCK_N):  # every tile holds at least one position in [lo, end)
        pos = n0 + offs_n
        valid = (pos >= lo) & (pos < end)
        k, v = kv_tile(
            table, k_base, v_base, pos, valid, offs_d, d_mask, block_size,
            stride_kb, stride_kt, stride_vb, stride_vt, UPCAST,
        )  # fmt: skip
        s = tl.dot(q, k, input_precision=PRECISION) * scale  # [BG, BN]
        if softcap > 0:
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # softcap * tanh(s / softcap)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, tl.standard._elementwise_max))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        den = den * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        p = p.to(v_ptr.dtype.element_ty)  # P @ V in the cache's dtype, as on the GPU
        if UPCAST:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new

    if SPLIT:
        num_heads = tl.num_programs(1) * group
        part = (b.to(tl.int64) * num_heads + heads) * tl.num_programs(2) + split  # [BG]
        tl.store(acc_ptr + part[:, None] * head_dim + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(m_ptr + part, m, mask=g_mask)
        tl.store(den_ptr + part, den, mask=g_mask)
    else:
        if HAS_SINKS:
            sink = tl.load(sink_ptr + heads, mask=g_mask, other=0.0)
            m_new = tl.maximum(m, sink)
            alpha = tl.exp(m - m_new)
            den = den * alpha + tl.exp(sink - m_new)
            acc = acc * alpha[:, None]
        out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        out = acc / den[:, None]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _paged_reduce_kernel(
    out_ptr, acc_ptr, m_ptr, den_ptr,  # out [B, Hq, D]; acc [B, Hq, S, D], m, den [B, Hq, S] fp32
    seq_len_ptr, sink_ptr,  # [B] i32, [Hq] fp32
    head_dim, split_len, num_splits,
    stride_ob, stride_oh,
    BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    row = (b.to(tl.int64) * tl.num_programs(1) + h) * num_splits
    last = (tl.load(seq_len_ptr + b) - 1) // split_len  # holds the query's own position: never empty
    m = tl.load(m_ptr + row + last)
    den = tl.load(den_ptr + row + last)
    acc = tl.load(acc_ptr + (row + last) * head_dim + offs_d, mask=d_mask, other=0.0)
    for split in range(0, num_splits):  # empty splits hold m = -inf, den = 0, acc = 0
        m_s = tl.where(split == last, float("-inf"), tl.load(m_ptr + row + split))
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_s - m_new)
        den = den * alpha + tl.load(den_ptr + row + split) * beta
        acc_s = tl.load(acc_ptr + (row + split) * head_dim + offs_d, mask=d_mask, other=0.0)
        acc = acc * alpha + acc_s * beta
        m = m_new

    if HAS_SINKS:
        sink = tl.load(sink_ptr + h)
        m_new = tl.maximum(m, sink)
        alpha = tl.exp(m - m_new)
        den = den * alpha + tl.exp(sink - m_new)
        acc = acc * alpha
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(out_ptrs, (acc / den).to(out_ptr.dtype.element_ty), mask=d_mask)


TILE = 4096  # elements of the K (and the V) tile per step for half types: larger tiles spill with 4 warps
FP32_BLOCK_N = {128: 32}  # fp32 (its dot runs on FMAs): 16 tokens a step, but at BLOCK_D 128 16 leaves a stack frame
TARGET_PROGRAMS = 512  # (sequence, kv head, split) programs that keep a GPU's memory busy
MAX_SPLITS = 64
MIN_SPLIT_LEN = 256  # tokens: shorter splits cost more in partials and merging than they gain


def decode_config(
    batch: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    max_context: int,
    dtype=torch.float16,
    interpreter: bool = False,
) -> dict:
    """Tiles: tl.dot needs >= 16 per side (the group pads to 16 rows). Split the context when there are too
    few (sequence, kv head) programs. Under the interpreter (a CPU) every loop step costs: big tiles, no split."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    if interpreter:
        return dict(BLOCK_G=block_g, BLOCK_N=128, BLOCK_D=block_d, NUM_SPLITS=1)
    block_n = FP32_BLOCK_N.get(block_d, 16) if dtype == torch.float32 else max(16, min(64, TILE // block_d))
    splits = 1
    while (
        splits < MAX_SPLITS
        and batch * num_kv_heads * splits < TARGET_PROGRAMS
        and max_context >= 2 * splits * MIN_SPLIT_LEN
    ):
        splits *= 2
    return dict(BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, NUM_SPLITS=splits)


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, >= 1, the current token included
    scale: float,
    softcap: float = 0.0,  # > 0: scores = softcap * tanh(scores / softcap)
    window: int = 0,  # > 0: only the last `window` positions, the query's own included
    sinks: torch.Tensor | None = None,  # [Hq] fp32: one more logit per head in the softmax, no value
    config: dict | None = None,
) -> torch.Tensor:
    """-> out [B, Hq, D] in q's dtype. NUM_SPLITS is sized from max_blocks * block_size (no sync on seq_lens)."""
    assert q.ndim == 3 and k_cache.ndim == 4 and k_cache.shape == v_cache.shape, (q.shape, k_cache.shape)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0, (q.shape, k_cache.shape)
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1
    assert block_tables.ndim == 2 and block_tables.shape[0] == seq_lens.shape[0] == batch
    assert block_tables.dtype == seq_lens.dtype == torch.int32 and block_tables.stride(1) == 1
    assert sinks is None or (sinks.shape == (num_heads,) and sinks.dtype == torch.float32 and sinks.stride(0) == 1)
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    cfg = config or decode_config(
        batch, num_kv_heads, group, head_dim, max_context, q.dtype, interpreter=q.device.type == "cpu"
    )
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    splits = cfg["NUM_SPLITS"]
    split_len = triton.cdiv(triton.cdiv(max_context, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    acc = m = den = dummy
    if splits > 1:
        acc = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        m, den = (torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device) for _ in range(2))
    sink_arg = dummy if sinks is None else sinks
    window_arg = window if window > 0 else NO_WINDOW
    _paged_decode_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, out, acc, m, den, block_tables, seq_lens, sink_arg,
        scale, softcap, window_arg, block_size, group, head_dim, split_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), block_tables.stride(0),
        BLOCK_G=cfg["BLOCK_G"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], SPLIT=splits > 1,
        HAS_SINKS=sinks is not None and splits == 1, **dot_options(q.dtype, q.device),  # else the merge adds them
    )  # fmt: skip
    if splits > 1:
        _paged_reduce_kernel[(batch, num_heads)](
            out, acc, m, den, seq_lens, sink_arg, head_dim, split_len, splits, out.stride(0), out.stride(1),
            BLOCK_D=cfg["BLOCK_D"], HAS_SINKS=sinks is not None,
        )  # fmt: skip
    return out


def paged_decode_attention_ref(
    q, k_cache, v_cache, block_tables, seq_lens, scale, softcap=0.0, window=0, sinks=None
) -> torch.Tensor:
    """Plain torch, sequence by sequence: gather positions [lo, seq_len) through the block table, fp32."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1:3]
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        pos = torch.arange(max(seq_len - window, 0) if window > 0 else 0, seq_len, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        if sinks is not None:
            scores = torch.cat([scores, sinks[:, None].float()], dim=1)
        probs = torch.softmax(scores, dim=1)[:, : len(pos)]
        out[b] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)
    return out
