"""The LoRA kernel wrapper: y += s_i * B_i (A_i x) for every token of a mixed batch.

Layers call `add_lora` and never a kernel directly. The per-step metadata (`LoRABatch`) is built
once from the token -> slot map and reused by every layer of that step.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRABatch:
    token_slots: torch.Tensor  # [T] int32, -1 = no adapter
    sorted_tokens: torch.Tensor  # [T_lora] token indices grouped by slot (stable)
    slots: tuple[int, ...]  # active slots, in segment order
    starts: tuple[int, ...]  # segment start in sorted_tokens, one per active slot
    lengths: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def make_batch(token_slots: torch.Tensor) -> LoRABatch | None:
    """Segments tokens by slot; None when no token uses an adapter."""
    token_slots = token_slots.to(torch.int32)
    has_lora = token_slots >= 0
    if not bool(has_lora.any()):
        return None
    order = torch.argsort(token_slots, stable=True)
    order = order[has_lora[order]]
    slots, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return LoRABatch(token_slots, order, tuple(slots.tolist()), tuple(starts.tolist()), tuple(counts.tolist()))


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: list[int],
    scales: list[float],
    batch: LoRABatch,
) -> None:
    """y[T, d_out] += scale[s] * (x[T, d_in] @ a[s, :r].T) @ b[s, :, :r].T for each token's slot s.

    a: [S, r_max, d_in], b: [S, d_out, r_max]; a slot whose rank is 0 here leaves its tokens as they are.
    One matmul pair per distinct adapter in the batch (never per request); fp32 accumulation.
    """
    assert x.shape[0] == y.shape[0] == batch.num_tokens, (x.shape, y.shape, batch.num_tokens)
    for slot, start, n in zip(batch.slots, batch.starts, batch.lengths):
        r = ranks[slot]
        if r == 0:
            continue
        rows = batch.sorted_tokens[start : start + n]
        xs = x.index_select(0, rows).float()
        delta = (xs @ a[slot, :r].float().T) @ b[slot, :, :r].float().T
        y.index_add_(0, rows, (delta * scales[slot]).to(y.dtype))
