"""The LoRA kernel wrapper: y += s_i * B_i (A_i x) for every token of a mixed batch, on whole slices.

Layers own `SlotWeights` and call `LoRAOps.add`; this module is the only one that imports `kernels`.
Backends: "triton" (our kernels; under the Triton interpreter on a CPU) and "torch" (the same
semantics in torch, one matmul pair per adapter in the batch, in PEFT's order of operations).
"""

import os
from dataclasses import dataclass

import torch

from kernels.segments import Segments, segment_tokens

BACKENDS = ("auto", "triton", "torch")
__all__ = ["BACKENDS", "LoRAOps", "Segments", "SlotWeights", "segment_tokens"]


@dataclass
class SlotWeights:
    """Adapter slots of one layer, or of a fused group of layers sharing their input (slices).

    a [L, S, R, d_in], b [S, N, R] with slice l in columns starts[l] : starts[l] + widths[l] of b
    and of the output; ranks / scales [L][S] (rank 0: no adapter on that slice in that slot).
    """

    a: torch.Tensor
    b: torch.Tensor
    starts: list[int]
    widths: list[int]
    ranks: list[list[int]]
    scales: list[list[float]]
    rank_t: torch.Tensor  # [L, S] int32 on the device: the kernels' copy of ranks
    scale_t: torch.Tensor  # [L, S] fp32
    starts_t: torch.Tensor  # [L] int32
    widths_t: torch.Tensor

    @classmethod
    def allocate(cls, num_slots: int, max_rank: int, d_in: int, widths: list[int], dtype, device) -> "SlotWeights":
        starts = [sum(widths[:i]) for i in range(len(widths))]
        n = len(widths)
        kw = {"dtype": dtype, "device": device}
        as_int = {"dtype": torch.int32, "device": device}
        return cls(
            a=torch.zeros(n, num_slots, max_rank, d_in, **kw),
            b=torch.zeros(num_slots, sum(widths), max_rank, **kw),
            starts=starts,
            widths=list(widths),
            ranks=[[0] * num_slots for _ in widths],
            scales=[[0.0] * num_slots for _ in widths],
            rank_t=torch.zeros(n, num_slots, **as_int),
            scale_t=torch.zeros(n, num_slots, dtype=torch.float32, device=device),
            starts_t=torch.tensor(starts, **as_int),
            widths_t=torch.tensor(widths, **as_int),
        )

    def set(self, slot: int, sl: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Puts one adapter's (a [r, d_in], b [width, r], scale) for slice sl into slot; None clears it."""
        r = 0 if a is None else a.shape[0]
        cols = slice(self.starts[sl], self.starts[sl] + self.widths[sl])
        self.a[sl, slot].zero_()
        self.b[slot, cols].zero_()
        if r:
            self.a[sl, slot, :r].copy_(a)
            self.b[slot, cols, :r].copy_(b)
        self.ranks[sl][slot], self.scales[sl][slot] = r, (scale if r else 0.0)
        self.rank_t[sl, slot], self.scale_t[sl, slot] = r, self.scales[sl][slot]

    def active(self, batch: Segments) -> bool:
        return any(ranks[slot] for ranks in self.ranks for slot, _, _ in batch.host)

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


class LoRAOps:
    def __init__(self, backend: str, device: str | torch.device):
        if backend not in BACKENDS:
            raise ValueError(f"lora_backend must be one of {BACKENDS}, got {backend!r}")
        on_gpu = torch.device(device).type == "cuda"
        self.backend = ("triton" if on_gpu else "torch") if backend == "auto" else backend
        if self.backend == "triton":
            if not on_gpu:
                # No GPU: the same kernels, run by Triton's interpreter (decided when they are imported).
                os.environ["TRITON_INTERPRET"] = "1"
            from kernels.lora_expand import lora_expand  # here: after the interpreter was chosen
            from kernels.lora_shrink import lora_shrink

            self.shrink, self.expand = lora_shrink, lora_expand

    def add(self, y: torch.Tensor, x: torch.Tensor, w: SlotWeights, batch: Segments) -> None:
        """y [T, N] += LoRA(x [T, d_in]) for every slice of w, in place."""
        assert x.shape[0] == y.shape[0] == batch.num_tokens, (x.shape, y.shape, batch.num_tokens)
        if not w.active(batch):
            return
        if self.backend == "torch":
            self._add_torch(y, x, w, batch)
            return
        seg = (batch.sorted_tokens, batch.slots, batch.starts, batch.lens, batch.max_len)
        t = self.shrink(x, w.a, w.rank_t, w.scale_t, *seg)
        self.expand(y, t, w.b, w.rank_t, w.starts_t, w.widths_t, max(w.widths), *seg)

    @staticmethod
    def _add_torch(y, x, w: SlotWeights, batch: Segments) -> None:
        for slot, start, n in batch.host:
            rows = batch.sorted_tokens[start : start + n].long()
            xs = x.index_select(0, rows).float()
            for sl, ranks in enumerate(w.ranks):
                r = ranks[slot]
                if r == 0:
                    continue
                cols = slice(w.starts[sl], w.starts[sl] + w.widths[sl])
                delta = (xs @ w.a[sl, slot, :r].float().T) @ w.b[slot, cols, :r].float().T
                y[:, cols].index_add_(0, rows, (delta * w.scales[sl][slot]).to(y.dtype))
