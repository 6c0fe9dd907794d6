"""lora_shrink: t[l, tok, :r] = scale[l, s] * x[tok] @ A[l, s, :r].T for every token of a mixed batch.

One launch covers every adapter (slot s), every slice l (fused q/k/v or gate/up share x) and every
token; tokens are visited through per-step segment metadata (tokens grouped by slot), so the launch
count does not depend on the mix. Blocks past a slot's rank do no work. fp32 accumulation.
Split-K: each K split writes its own partial t[split] (no zero-fill launch, no atomics, the same
result every run); lora_expand sums the splits as it reads t.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr,  # x [T, d_in], a [L, S, R, d_in], t [SPLIT_K, L, T, R] fp32
    sorted_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,  # tokens grouped by slot; one entry per segment
    rank_ptr, scale_ptr,  # [L, S]
    d_in, max_rank, num_slots,
    stride_xm, stride_xk,
    stride_al, stride_as, stride_ar, stride_ak,
    stride_ts, stride_tl, stride_tm, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    sl = tl.program_id(1)
    seg = tl.program_id(2)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(rank_ptr + sl * num_slots + slot)
    seg_len = tl.load(seg_len_ptr + seg)
    pid_k = pid % SPLIT_K
    pid_mn = pid // SPLIT_K
    num_n = (max_rank + BLOCK_N - 1) // BLOCK_N
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n
    if pid_m * BLOCK_M >= seg_len or pid_n * BLOCK_N >= rank:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    tok = tl.load(sorted_ptr + tl.load(seg_start_ptr + seg) + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < rank
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
    a_base = a_ptr + sl.to(tl.int64) * stride_al + slot.to(tl.int64) * stride_as
    a_ptrs = a_base + offs_n[None, :] * stride_ar + offs_k[:, None] * stride_ak  # [BK, BN]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    step = BLOCK_K * SPLIT_K
    for k0 in range(0, (d_in + step - 1) // step):
        k_mask = offs_k < d_in - k0 * step
        xk = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        ak = tl.load(a_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            xk, ak = xk.to(tl.float32), ak.to(tl.float32)
        acc += tl.dot(xk, ak, input_precision=PRECISION)
        x_ptrs += step * stride_xk
        a_ptrs += step * stride_ak
    acc *= tl.load(scale_ptr + sl * num_slots + slot)

    t_base = t_ptr + pid_k.to(tl.int64) * stride_ts + sl.to(tl.int64) * stride_tl
    t_ptrs = t_base + tok[:, None] * stride_tm + offs_n[None, :] * stride_tr
    tl.store(t_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


# Elements of the A tile per program: larger tiles spill out of registers with 4 warps (kernels.aot).
TILE = {torch.float32: 1024, torch.float16: 2048, torch.bfloat16: 2048}


def shrink_config(
    num_tokens: int, max_rank: int, d_in: int, num_segments: int, dtype=torch.float16, interpreter: bool = False
) -> dict:
    """Block sizes: tl.dot needs >= 16 per side; split K when there are too few blocks to fill a GPU.
    Under the interpreter (a CPU) registers do not matter and every loop step costs: one big K block."""
    block_n = min(64, max(16, triton.next_power_of_2(max_rank)))
    block_k = min(512 if interpreter else TILE[dtype] // block_n, max(16, triton.next_power_of_2(d_in)))
    if interpreter:
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1)
    blocks = num_segments * triton.cdiv(max(num_tokens // max(num_segments, 1), 1), 16)
    split_k = 1 if blocks >= 128 or d_in <= block_k else min(8, triton.cdiv(d_in, block_k))
    return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k)


def dot_options(dtype: torch.dtype, device: torch.device) -> dict:
    """fp32 stays exact (no tf32); half types use their own MMA. Triton's interpreter (a CPU) computes a
    bf16 tl.dot wrongly (triton 3.9), so there bf16 operands go to fp32 first: the same products."""
    upcast = device.type == "cpu" and dtype == torch.bfloat16
    return dict(PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)


def lora_shrink(
    x: torch.Tensor,  # [T, d_in]
    a: torch.Tensor,  # [L, S, R, d_in]
    ranks: torch.Tensor,  # [L, S] int32; 0 = this slot has no adapter on this slice
    scales: torch.Tensor,  # [L, S] fp32
    sorted_tokens: torch.Tensor,  # [T_lora] int32, token indices grouped by slot
    seg_slots: torch.Tensor,  # [Na] int32
    seg_starts: torch.Tensor,  # [Na] int32, into sorted_tokens
    seg_lens: torch.Tensor,  # [Na] int32
    max_seg_len: int,
    config: dict | None = None,
) -> torch.Tensor:
    """-> t [SPLIT_K, L, T, R] fp32 partial sums. Only what lora_expand reads is written: rows of tokens
    with an adapter, columns below that slot's rank."""
    assert x.ndim == 2 and a.ndim == 4 and x.shape[1] == a.shape[3], (x.shape, a.shape)
    assert x.dtype == a.dtype, (x.dtype, a.dtype)
    assert ranks.shape == scales.shape == a.shape[:2] and ranks.dtype == torch.int32 and scales.dtype == torch.float32
    num_slices, num_slots, max_rank, d_in = a.shape
    num_segments = seg_slots.shape[0]
    cfg = config or shrink_config(
        sorted_tokens.shape[0], max_rank, d_in, num_segments, x.dtype, interpreter=x.device.type == "cpu"
    )
    # rows padded to a multiple of 16: t's strides, which Triton specializes on, do not vary with the batch
    rows = triton.cdiv(x.shape[0], 16) * 16
    t = torch.empty(cfg["SPLIT_K"], num_slices, rows, max_rank, dtype=torch.float32, device=x.device)
    t = t[:, :, : x.shape[0]]
    if num_segments == 0:
        return t
    grid_m = triton.cdiv(max_seg_len, cfg["BLOCK_M"]) * triton.cdiv(max_rank, cfg["BLOCK_N"])
    grid = (grid_m * cfg["SPLIT_K"], num_slices, num_segments)
    _lora_shrink_kernel[grid](
        x, a, t, sorted_tokens, seg_slots, seg_starts, seg_lens, ranks, scales,
        d_in, max_rank, num_slots,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), a.stride(3),
        t.stride(0), t.stride(1), t.stride(2), t.stride(3),
        **dot_options(x.dtype, x.device), **cfg,
    )  # fmt: skip
    return t


def lora_shrink_ref(x, a, ranks, scales, token_slots) -> torch.Tensor:
    """Plain torch: token by token, slice by slice. token_slots [T] (-1 = no adapter)."""
    num_slices, _, max_rank, _ = a.shape
    t = torch.zeros(num_slices, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    for tok, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        for sl in range(num_slices):
            r = int(ranks[sl, slot])
            t[sl, tok, :r] = float(scales[sl, slot]) * (a[sl, slot, :r].float() @ x[tok].float())
    return t
