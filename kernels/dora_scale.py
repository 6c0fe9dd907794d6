"""dora_scale: y[tok, n] = y[tok, n] * g[s, n] + c[s, n] for every token of a DoRA slot s, after the LoRA delta.

g is DoRA's magnitude over the adapted weight's column norm, c = (1 - g) * bias (the caller's); both fp32. In
place on y, visited through the step's segments as lora_expand does; segments of other slots return at once.
Columns with g = 1 and c = 0 keep y's bits (a -0.0 too, which y * 1 + 0 would turn into +0.0).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _dora_scale_kernel(
    y_ptr, g_ptr, c_ptr, dora_ptr,  # y [T, N] (unit column stride), g and c [S, N] fp32, dora [S] int32
    sorted_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    N, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2)
    slot = tl.load(seg_slot_ptr + seg)
    seg_len = tl.load(seg_len_ptr + seg)
    if tl.load(dora_ptr + slot) == 0 or pid_m * BLOCK_M >= seg_len:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    tok = tl.load(sorted_ptr + tl.load(seg_start_ptr + seg) + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    gc = slot.to(tl.int64) * N + offs_n
    g = tl.load(g_ptr + gc, mask=n_mask, other=1.0)[None, :]
    c = tl.load(c_ptr + gc, mask=n_mask, other=0.0)[None, :]
    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :]  # [BM, BN]
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    out = tl.where((g == 1.0) & (c == 0.0), y, (y.to(tl.float32) * g + c).to(y.dtype))
    tl.store(y_ptrs, out, mask=mask)


def dora_config(n: int, interpreter: bool = False) -> dict:
    """A 16 x 256 tile at most on a GPU (what kernels.aot compiles). Under the interpreter (a CPU) every
    program costs: few, large blocks."""
    block_n = min(1024 if interpreter else 256, max(16, triton.next_power_of_2(n)))
    return dict(BLOCK_M=64 if interpreter else 16, BLOCK_N=block_n)


def dora_scale(
    y: torch.Tensor,  # [T, N], updated in place; any row stride, unit column stride
    g: torch.Tensor,  # [S, N] fp32
    c: torch.Tensor,  # [S, N] fp32: (1 - g) * bias
    dora: torch.Tensor,  # [S] int32; nonzero: a DoRA slot
    sorted_tokens: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    max_len: int,
    config: dict | None = None,
) -> None:
    assert y.ndim == 2 and (y.stride(1) == 1 or y.shape[1] <= 1), (y.shape, y.stride())
    assert g.shape == c.shape == (dora.shape[0], y.shape[1]), (g.shape, c.shape, dora.shape, y.shape)
    assert g.dtype == c.dtype == torch.float32 and g.is_contiguous() and c.is_contiguous()
    assert dora.dtype == torch.int32 and dora.is_contiguous()
    num_segments = seg_slots.shape[0]
    if num_segments == 0 or y.shape[1] == 0:
        return
    cfg = config or dora_config(y.shape[1], interpreter=y.device.type == "cpu")
    grid = (triton.cdiv(max_len, cfg["BLOCK_M"]), triton.cdiv(y.shape[1], cfg["BLOCK_N"]), num_segments)
    _dora_scale_kernel[grid](
        y, g, c, dora, sorted_tokens, seg_slots, seg_starts, seg_lens, y.shape[1], y.stride(0), **cfg
    )  # fmt: skip


def dora_scale_ref(y, g, c, dora, token_slots) -> torch.Tensor:
    """Plain torch, out of place. token_slots [T] (-1 = no adapter)."""
    out = y.clone()
    slots = token_slots.long()
    rows = (slots >= 0) & (dora[slots.clamp(min=0)] != 0)
    s = slots[rows]
    keep = (g[s] == 1) & (c[s] == 0)
    out[rows] = torch.where(keep, y[rows], (y[rows].float() * g[s] + c[s]).to(y.dtype))
    return out
