"""Per-step token metadata shared by every LoRA launch of the step: tokens grouped by adapter slot."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    token_slots: torch.Tensor  # [T] int32, -1 = no adapter
    sorted_tokens: torch.Tensor  # [T_lora] int32: token indices with an adapter, grouped by slot (stable)
    slots: torch.Tensor  # [Na] int32: the slot of each segment
    starts: torch.Tensor  # [Na] int32: where each segment starts in sorted_tokens
    lens: torch.Tensor  # [Na] int32
    max_len: int  # longest segment: sizes the launch grid
    host: tuple[tuple[int, int, int], ...]  # (slot, start, len) per segment, for host-side code

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def segment_tokens(token_slots: torch.Tensor) -> Segments | None:
    """token_slots [T] -> segments of tokens per slot; None when no token uses an adapter."""
    token_slots = token_slots.to(torch.int32)
    order = torch.argsort(token_slots, stable=True)
    order = order[token_slots[order] >= 0]
    if order.numel() == 0:
        return None
    slots, lens = torch.unique_consecutive(token_slots[order], return_counts=True)
    starts = torch.cumsum(lens, 0) - lens
    host = tuple(zip(slots.tolist(), starts.tolist(), lens.tolist()))
    as_int = {"dtype": torch.int32}
    return Segments(
        token_slots,
        order.to(**as_int),
        slots.to(**as_int),
        starts.to(**as_int),
        lens.to(**as_int),
        max(n for _, _, n in host),
        host,
    )
