"""Per-step token metadata shared by every LoRA launch of the step: tokens grouped by adapter slot."""

from dataclasses import dataclass
from functools import cached_property

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
    first: int | None  # set when sorted_tokens is range(first, T): the step laid its tokens out by slot

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @cached_property
    def slot_set(self) -> frozenset[int]:
        return frozenset(slot for slot, _, _ in self.host)


def segment_tokens(token_slots: torch.Tensor) -> Segments | None:
    """token_slots [T] (any order) -> segments of tokens per slot; None when no token uses an adapter."""
    token_slots = token_slots.to(torch.int32)
    order = torch.argsort(token_slots, stable=True)
    order = order[token_slots[order] >= 0]
    if order.numel() == 0:
        return None
    slots, lens = torch.unique_consecutive(token_slots[order], return_counts=True)
    starts = torch.cumsum(lens, 0) - lens
    host = tuple(zip(slots.tolist(), starts.tolist(), lens.tolist()))
    return _segments(token_slots, order, host, None)


def sorted_segments(token_slots: list[int], device) -> Segments | None:
    """Segments of a step whose tokens are already laid out by slot: tokens without an adapter (-1)
    first, then each slot's tokens together, slots ascending. Built on the host, with no device work."""
    first = next((i for i, s in enumerate(token_slots) if s >= 0), None)
    if first is None:
        return None
    host, start = [], 0
    for i in range(first, len(token_slots)):
        slot = token_slots[i]
        if i == len(token_slots) - 1 or token_slots[i + 1] != slot:
            host.append((slot, start, i + 1 - first - start))
            start = i + 1 - first
    assert all(a[0] < b[0] for a, b in zip(host, host[1:])), "tokens are not laid out by ascending slot"
    order = torch.arange(first, len(token_slots), dtype=torch.int32, device=device)
    return _segments(torch.tensor(token_slots, dtype=torch.int32, device=device), order, tuple(host), first)


def _segments(token_slots, order, host, first) -> Segments:
    as_int = {"dtype": torch.int32, "device": token_slots.device}
    slots, starts, lens = (torch.tensor(col, **as_int) for col in zip(*host))
    return Segments(token_slots, order.to(torch.int32), slots, starts, lens, max(n for _, _, n in host), host, first)
