"""The LoRA kernel wrapper: y += s_i * B_i (A_i x) for every token of a mixed batch, on whole slices, then
for DoRA slots y = g_i ⊙ y + c_i (g_i = m / ‖W + s·B·A‖ per output column, c_i = (1 - g_i) ⊙ bias).

Layers own `SlotWeights` and call `LoRAOps.add`; this module is the only one that imports `kernels`.
Backends: "triton" (our kernels; under the Triton interpreter on a CPU) and "torch" (the same
semantics in PEFT's order of operations: on a CPU two batched matmuls per slice over the slots'
stacked weights, however many adapters the batch holds; on a GPU one matmul pair per adapter).
"""

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import torch

from kernels.segments import Segments, segment_tokens, sorted_segments

BACKENDS = ("auto", "triton", "torch")
__all__ = [
    "BACKENDS",
    "LoRAOps",
    "pick_backend",
    "Rows",
    "Segments",
    "SlotWeights",
    "segment_tokens",
    "sorted_segments",
]


@dataclass
class SlotWeights:
    """Adapter slots of one layer, or of a fused group of layers sharing their input (slices).

    a [L, S, R, d_in], b [S, N, R] with slice l in columns starts[l] : starts[l] + widths[l] of b
    and of the output; ranks / scales [L][S] (rank 0: no adapter on that slice in that slot).
    DoRA: g, c [S, N] fp32, made when a DoRA adapter first fills a slot; g = 1, c = 0 elsewhere, which
    leaves y as it is, bit for bit.
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
    bias: torch.Tensor | None = None  # [N] fp32: the base layers' bias, which DoRA does not scale
    g: torch.Tensor | None = None
    c: torch.Tensor | None = None
    dora: list[list[bool]] = field(default_factory=list)  # [L][S]
    dora_t: torch.Tensor | None = None  # [S] int32: 1 where the slot's adapter is DoRA on some slice

    @classmethod
    def allocate(
        cls, num_slots: int, max_rank: int, d_in: int, widths: list[int], dtype, device, bias=None
    ) -> "SlotWeights":
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
            bias=None if bias is None else bias.detach().float().clone(),
            dora=[[False] * num_slots for _ in widths],
            dora_t=torch.zeros(num_slots, **as_int),
        )

    def set(self, slot: int, sl: int, a, b, scale: float, g: torch.Tensor | None = None) -> None:
        """Puts one adapter's (a [r, d_in], b [width, r], scale, DoRA's g [width] or None) for slice sl into
        slot; a None clears it."""
        r = 0 if a is None else a.shape[0]
        cols = slice(self.starts[sl], self.starts[sl] + self.widths[sl])
        self.a[sl, slot].zero_()
        self.b[slot, cols].zero_()
        if r:
            self.a[sl, slot, :r].copy_(a)
            self.b[slot, cols, :r].copy_(b)
        self.ranks[sl][slot], self.scales[sl][slot] = r, (scale if r else 0.0)
        self.rank_t[sl, slot], self.scale_t[sl, slot] = r, self.scales[sl][slot]
        dora = r > 0 and g is not None
        if dora:
            self.make_dora()
        if self.g is not None:
            self.g[slot, cols] = g if dora else 1.0
            bias = 0.0 if self.bias is None else self.bias[cols]
            self.c[slot, cols] = (1.0 - g) * bias if dora else 0.0
        self.dora[sl][slot] = dora
        self.dora_t[slot] = self.dora_slot(slot)

    def make_dora(self) -> None:
        """g = 1 and c = 0 in every slot, unless made already (a replayed step reads them from the start)."""
        if self.g is None:
            self.g = torch.ones(self.b.shape[:2], dtype=torch.float32, device=self.b.device)
            self.c = torch.zeros_like(self.g)

    def dora_slot(self, slot: int) -> bool:
        """The slot's adapter is DoRA on some slice."""
        return any(d[slot] for d in self.dora)

    def dora_in(self, batch: Segments) -> bool:
        return self.g is not None and any(self.dora_slot(slot) for slot in batch.slot_set)

    def active(self, batch: Segments) -> bool:
        return any(ranks[slot] for ranks in self.ranks for slot in batch.slot_set)

    def rank_in(self, sl: int, batch: Segments) -> int:
        """The highest rank of slice sl among the batch's slots (0: no adapter of the batch has it)."""
        return max(self.ranks[sl][slot] for slot in batch.slot_set)

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


@dataclass(frozen=True)
class Layout:
    """How the torch path lays out a step's LoRA rows (tokens grouped by slot, slots ascending) for
    batched matmuls over the slot buffers: over a view of slots lo .. lo + num - 1, or, where most of
    that range is unused, over a copy of the `num` slots in `gather`.
    Padded: [num, width] rows, one line of `width` per slot (pad_pos: where each row goes; None when
    every slot has exactly `width` rows). Grouped: one grouped matmul with `offsets`."""

    lo: int
    num: int
    gather: torch.Tensor | None  # [num] long: the slots, when copied rather than viewed
    width: int  # 0: grouped
    pad_pos: torch.Tensor | None  # [n] long
    offsets: torch.Tensor | None  # [num] int32: end of each slot's rows (grouped)
    row_slots: torch.Tensor | None  # [n] long: the position of each row's slot among the num (grouped)

    @classmethod
    def of(cls, seg: Segments) -> "Layout":
        used = [s for s, _, _ in seg.host]
        lo, span = used[0], used[-1] - used[0] + 1
        position = {s: s - lo for s in used} if span <= 2 * len(used) else {s: i for i, s in enumerate(used)}
        num, width, n = max(position.values()) + 1, seg.max_len, seg.sorted_tokens.shape[0]
        device = seg.token_slots.device
        gather = None if num == span else torch.tensor(used, device=device)
        if num * width <= max(4 * n, 256):  # padding costs less than a grouped matmul's per-slot overhead
            if num * width == n:  # every slot has exactly `width` rows: they are in place
                return cls(lo, num, gather, width, None, None, None)
            pos = [position[s] * width + i for s, _, k in seg.host for i in range(k)]
            return cls(lo, num, gather, width, torch.tensor(pos, device=device), None, None)
        counts = [0] * num
        for s, _, k in seg.host:
            counts[position[s]] = k
        offsets = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)
        row_slots = torch.tensor([position[s] for s, _, k in seg.host for _ in range(k)], device=device)
        return cls(lo, num, gather, 0, None, offsets, row_slots)

    def weights(self, w: "SlotWeights", sl: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [num, d_in, r], B [num, r, width], scale [num]) of slice sl for the layout's slots."""
        cols = slice(w.starts[sl], w.starts[sl] + w.widths[sl])
        if self.gather is None:
            slots = slice(self.lo, self.lo + self.num)
            a, b, scale = w.a[sl, slots, :r], w.b[slots, cols, :r], w.scale_t[sl, slots]
        else:
            a = w.a[sl, :, :r].index_select(0, self.gather)
            b = w.b[:, cols, :r].index_select(0, self.gather)
            scale = w.scale_t[sl].index_select(0, self.gather)
        return a.transpose(1, 2), b.transpose(1, 2), scale


@dataclass(frozen=True)
class Rows:
    """One step's LoRA metadata for the rows a layer sees (every token, or each sequence's last)."""

    seg: Segments
    layout: Layout | None  # the torch path's
    fixed: bool = False  # a step shaped for replay: every launch runs, whatever the batch's adapters


def seg_args(seg: Segments) -> tuple:
    """What every LoRA kernel launch takes of a step's segments."""
    return seg.sorted_tokens, seg.slots, seg.starts, seg.lens, seg.max_len


def variant_batches(config, max_rows: int, num_slots: int) -> list[tuple[int, int]]:
    """(rows, segments) of one batch per launch config that `config(rows, segments)` (the shrink launcher's
    choice) gives for up to max_rows rows. The choice depends on the batch only through its size (the split
    of K, by how many blocks of rows there are), so rows at powers of two and at the most are enough."""
    batches: dict[tuple, tuple[int, int]] = {}
    for rows in sorted({*(2**i for i in range(max_rows.bit_length())), max_rows}):
        for segments in range(1, min(num_slots, rows) + 1):
            batches.setdefault(tuple(sorted(config(rows, segments).items())), (rows, segments))
    return list(batches.values())


def pick_backend(setting: str, device: str | torch.device, name: str) -> str:
    """ "triton" or "torch" for a backend setting (auto: triton on a GPU, torch on a CPU). Triton without
    a GPU runs the same kernels in Triton's interpreter, chosen here, before any kernel is imported."""
    if setting not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {setting!r}")
    on_gpu = torch.device(device).type == "cuda"
    backend = ("triton" if on_gpu else "torch") if setting == "auto" else setting
    if backend == "triton" and not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    return backend


class LoRAOps:
    def __init__(self, backend: str, device: str | torch.device):
        self.backend = pick_backend(backend, device, "lora_backend")
        self.batched = torch.device(device).type != "cuda"  # the batched path (torch._grouped_mm) is for a CPU
        if self.backend == "triton":
            from kernels.dora_scale import dora_scale  # here: after the interpreter was chosen
            from kernels.lora_expand import lora_expand
            from kernels.lora_shrink import lora_shrink, shrink_config

            self.shrink, self.expand, self.shrink_config = lora_shrink, lora_expand, shrink_config
            self.dora_scale = dora_scale

    def rows(self, seg: Segments | None, fixed: bool = False) -> Rows | None:
        """A step's metadata for the layers, built once per step; None when no row has an adapter (fixed: the
        step is replayed, and its launches with it: triton only)."""
        if seg is None:
            return None
        assert not fixed or self.backend == "triton", "a replayed step needs the triton backend"
        return Rows(seg, Layout.of(seg) if self.backend == "torch" and self.batched else None, fixed)

    def warm_up(self, w: SlotWeights, max_rows: int) -> int:
        """Runs shrink and expand once for each kernel variant they can pick on these weights for up to
        max_rows rows; returns how many. Meanwhile every slot counts as an adapter of the highest rank, in
        copies of the rank tables: a slot's rank and weights pick no variant, and nothing of this stays."""
        if self.backend != "triton":
            return 0
        _, num_slots, max_rank, d_in = w.a.shape
        interpreter = w.a.device.type == "cpu"
        batches = variant_batches(
            lambda rows, segments: self.shrink_config(rows, max_rank, d_in, segments, w.a.dtype, interpreter),
            max_rows,
            num_slots,
        )
        full = dataclasses.replace(
            w, ranks=[[max_rank] * num_slots for _ in w.widths], rank_t=torch.full_like(w.rank_t, max_rank)
        )
        for rows, segments in batches:
            slots = [i * segments // rows for i in range(rows)]  # `segments` slots, ascending
            y = w.b.new_zeros(rows, w.b.shape[1])
            self.add(y, w.a.new_zeros(rows, d_in), full, self.rows(sorted_segments(slots, w.a.device)))
        ones = torch.ones(num_slots, w.b.shape[1], dtype=torch.float32, device=w.b.device)
        seg = sorted_segments([0], w.a.device)  # DoRA's scale: one variant per width, whatever the batch
        self.dora_scale(w.b.new_zeros(1, w.b.shape[1]), ones, ones - 1, torch.ones_like(w.dora_t), *seg_args(seg))
        return len(batches) + 1

    def add(self, y: torch.Tensor, x: torch.Tensor, w: SlotWeights, rows: Rows) -> None:
        """y [T, N] += LoRA(x [T, d_in]) for every slice of w, in place."""
        seg = rows.seg
        assert x.shape[0] == y.shape[0] == seg.num_tokens, (x.shape, y.shape, seg.num_tokens)
        if not rows.fixed and not w.active(seg):
            return
        if self.backend == "torch":
            if rows.layout is None:
                self._add_per_adapter(y, x, w, seg)
            else:
                self._add_batched(y, x, w, seg, rows.layout)
            if w.dora_in(seg):
                self._dora_scale(y, w, seg)
            return
        args = seg_args(seg)
        t = self.shrink(x, w.a, w.rank_t, w.scale_t, *args)
        self.expand(y, t, w.b, w.rank_t, w.starts_t, w.widths_t, max(w.widths), *args)
        if w.g is not None and (rows.fixed or w.dora_in(seg)):
            self.dora_scale(y, w.g, w.c, w.dora_t, *args)

    @staticmethod
    def _dora_scale(y, w: SlotWeights, seg: Segments) -> None:
        """y = g ⊙ y + c on the rows of each DoRA slot of the batch (fp32, as PEFT's fp32 forward)."""
        for slot, start, n in seg.host:
            if not w.dora_slot(slot):
                continue
            if seg.first is not None:
                rows = y[seg.first + start : seg.first + start + n]
                rows.copy_(torch.addcmul(w.c[slot], rows.float(), w.g[slot]))
            else:
                idx = seg.sorted_tokens[start : start + n].long()
                scaled = torch.addcmul(w.c[slot], y.index_select(0, idx).float(), w.g[slot])
                y.index_copy_(0, idx, scaled.to(y.dtype))

    @staticmethod
    def _add_batched(y, x, w: SlotWeights, seg: Segments, lay: Layout) -> None:
        """Per slice: d = (x @ A[slot].T) @ B[slot].T * scale, as two batched (or grouped) matmuls over
        the slot buffers cut to the batch's highest rank, whatever the number of adapters."""
        first = seg.first
        xs = x[first:] if first is not None else x.index_select(0, seg.sorted_tokens)
        if lay.width and lay.pad_pos is None:
            xs = xs.view(lay.num, lay.width, -1)
        elif lay.width:
            xs = xs.new_zeros(lay.num * lay.width, xs.shape[1]).index_copy_(0, lay.pad_pos, xs)
            xs = xs.view(lay.num, lay.width, -1)
        for sl in range(len(w.widths)):
            r = w.rank_in(sl, seg)
            if r == 0:
                continue
            cols = slice(w.starts[sl], w.starts[sl] + w.widths[sl])
            a, b, scale = lay.weights(w, sl, r)
            if lay.width:
                d = torch.bmm(torch.bmm(xs, a), b)  # [num, width, w]
                d *= scale.view(-1, 1, 1).to(d.dtype)
                d = d.view(-1, d.shape[2])
                if lay.pad_pos is not None:
                    d = d.index_select(0, lay.pad_pos)
            else:
                d = torch._grouped_mm(torch._grouped_mm(xs, a, offs=lay.offsets), b, offs=lay.offsets)
                d *= scale.index_select(0, lay.row_slots)[:, None].to(d.dtype)
            if first is not None:
                y[first:, cols] += d
            else:
                y[:, cols].index_add_(0, seg.sorted_tokens, d)

    @staticmethod
    def _add_per_adapter(y, x, w: SlotWeights, batch: Segments) -> None:
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
