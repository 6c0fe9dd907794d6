"""lora_expand: y[tok, off + c_l + n] += t[l, tok, :r] @ B[s, c_l + n, :r] for every token of a mixed batch.

t comes from lora_shrink as [SPLIT_K, L, T, R] partial sums, added up here as they are read.

In place on y at a column offset. Slices l (fused q/k/v or gate/up) have their own widths (GQA) and
start at column c_l of both y and B. One launch covers every adapter, slice and token; the rank loop
stops at each slot's rank. t is fp32 (from lora_shrink); it meets B in B's dtype, accumulates in fp32.
"""

import torch
import triton
import triton.language as tl

from kernels.lora_shrink import dot_options


@triton.jit
def _lora_expand_kernel(
    t_ptr, b_ptr, y_ptr,  # t [SPLIT_K, L, T, R] fp32, b [S, N_total, R], y [T, >= off + N_total]
    sorted_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    rank_ptr, slice_start_ptr, slice_width_ptr,  # [L, S], [L], [L]
    num_slots, max_width, y_offset, num_splits,
    stride_ts, stride_tl, stride_tm, stride_tr,
    stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    sl = tl.program_id(1)
    seg = tl.program_id(2)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(rank_ptr + sl * num_slots + slot)
    seg_len = tl.load(seg_len_ptr + seg)
    width = tl.load(slice_width_ptr + sl)
    num_n = (max_width + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid % num_n
    if rank == 0 or pid_m * BLOCK_M >= seg_len or pid_n * BLOCK_N >= width:
        return

    col = tl.load(slice_start_ptr + sl)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    tok = tl.load(sorted_ptr + tl.load(seg_start_ptr + seg) + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    offs_k = tl.arange(0, BLOCK_K)
    t_ptrs = t_ptr + sl.to(tl.int64) * stride_tl + tok[:, None] * stride_tm + offs_k[None, :] * stride_tr  # [BM, BK]
    b_base = b_ptr + slot.to(tl.int64) * stride_bs + col.to(tl.int64) * stride_bn
    b_ptrs = b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_br  # [BK, BN]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, (rank + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < rank - k0 * BLOCK_K
        tk = tl.load(t_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        for s in range(1, num_splits):
            tk += tl.load(t_ptrs + s * stride_ts, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bk = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        tk = tk.to(bk.dtype)
        if UPCAST:
            tk, bk = tk.to(tl.float32), bk.to(tl.float32)
        acc += tl.dot(tk, bk, input_precision=PRECISION)
        t_ptrs += BLOCK_K * stride_tr
        b_ptrs += BLOCK_K * stride_br

    y_ptrs = y_ptr + tok[:, None] * stride_ym + (y_offset + col + offs_n)[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def expand_config(max_rank: int, max_width: int, interpreter: bool = False) -> dict:
    """B tile of at most 2048 elements per program: larger ones spill with 4 warps (kernels.aot).
    Under the interpreter (a CPU): wide blocks, the whole rank at once."""
    block_n = min(512 if interpreter else 128, max(16, triton.next_power_of_2(max_width)))
    block_k = max(16, min(triton.next_power_of_2(max_rank), 64 if interpreter else 2048 // block_n))
    return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k)


def lora_expand(
    y: torch.Tensor,  # [T, >= y_offset + N_total], updated in place
    t: torch.Tensor,  # [SPLIT_K, L, T, R] fp32, from lora_shrink
    b: torch.Tensor,  # [S, N_total, R]
    ranks: torch.Tensor,  # [L, S] int32
    slice_starts: torch.Tensor,  # [L] int32: first column of each slice, in b and (after y_offset) in y
    slice_widths: torch.Tensor,  # [L] int32
    max_width: int,
    sorted_tokens: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    max_seg_len: int,
    y_offset: int = 0,
    config: dict | None = None,
) -> None:
    assert t.ndim == 4 and b.ndim == 3 and t.shape[3] == b.shape[2] and t.dtype == torch.float32, (t.shape, b.shape)
    assert y.ndim == 2 and y.shape[0] == t.shape[2] and y.dtype == b.dtype, (y.shape, y.dtype, b.dtype)
    num_slices = t.shape[1]
    assert ranks.shape == (num_slices, b.shape[0]) and slice_starts.shape == slice_widths.shape == (num_slices,)
    num_segments = seg_slots.shape[0]
    if num_segments == 0:
        return
    cfg = config or expand_config(b.shape[2], max_width, interpreter=y.device.type == "cpu")
    grid = (triton.cdiv(max_seg_len, cfg["BLOCK_M"]) * triton.cdiv(max_width, cfg["BLOCK_N"]), num_slices, num_segments)
    _lora_expand_kernel[grid](
        t, b, y, sorted_tokens, seg_slots, seg_starts, seg_lens, ranks, slice_starts, slice_widths,
        b.shape[0], max_width, y_offset, t.shape[0],
        t.stride(0), t.stride(1), t.stride(2), t.stride(3),
        b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
        **dot_options(b.dtype, b.device), **cfg,
    )  # fmt: skip


def lora_expand_ref(y, t, b, ranks, slice_starts, slice_widths, token_slots, y_offset: int = 0) -> torch.Tensor:
    """Plain torch, out of place, t [L, T, R] (lora_shrink_ref's): t meets B in B's dtype, sums in fp32,
    the result is rounded once."""
    out = y.clone()
    for tok, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        for sl in range(t.shape[0]):
            r, c, w = int(ranks[sl, slot]), int(slice_starts[sl]), int(slice_widths[sl])
            delta = t[sl, tok, :r].to(b.dtype).float() @ b[slot, c : c + w, :r].float().T
            cols = slice(y_offset + c, y_offset + c + w)
            out[tok, cols] = (y[tok, cols].float() + delta).to(y.dtype)
    return out
