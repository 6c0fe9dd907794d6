"""One step's inputs, built once per step into persistent buffers that every layer, LoRA op and kernel reads.

The buffers are sized at load for the most a step can hold: `max_tokens` tokens of `max_seqs` sequences, each
with up to `max_blocks` KV-cache blocks. A step is filled on the host (numpy views of one int64 and one int32
buffer, pinned on a GPU) and copied to the device in one transfer per buffer, whole, so that a captured step
reads the same addresses; on a CPU the host buffers are the device's. The step's tensors are views of them:
valid until the next step is built. Block tables are as wide as any sequence's can be (`max_blocks`).

Tokens are laid out base-model sequences first, then by adapter slot, so that each adapter's tokens are one
run; each sampled sequence's last token is taken in `work` order, as the logits come back.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from backend.lora import ops as lora_ops
from backend.lora.layers import LoRAStep
from backend.lora.ops import Segments
from backend.model.attention import AttentionMeta, ChunksMeta, DecodeMeta, PrefillMeta


@dataclass(frozen=True)
class SeqWork:
    table: list[int]  # its KV-cache blocks, enough for cached + len(tokens)
    tokens: list[int]  # tokens to feed this step
    cached: int  # tokens already in the cache
    slot: int  # LoRA slot, -1 for the base model
    sample: bool = True  # False for a prompt chunk that is not its last: no logits
    length: int = 0  # its whole length, prompt chunks or not: batch-dependent RoPE takes frequencies from it


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionMeta
    last: torch.Tensor  # [B] index of the last token of each sampled sequence: where logits are taken
    lora: LoRAStep  # which tokens use which adapter slot
    # (first token, tokens, whole length) of each sequence, in `work` order; batch-dependent RoPE reads it
    spans: tuple[tuple[int, int, int], ...]
    fixed: bool = False  # shaped for replay: see InputBatch.build
    real: int = 0  # a padded step's sequences before the padding (0: not padded)


SEG = ("slots", "starts", "lens")
CHUNK = ("q_starts", "q_lens", "kv_lens")  # first token in the step, tokens fed, keys after the step


def fill(buffers: "Buffers", prefix: str, names: tuple[str, ...], rows: list) -> None:
    """Columns of `rows` into the fields prefix + name."""
    for k, column in zip(names, zip(*rows)):
        getattr(buffers, prefix + k)[: len(column)] = column


class Buffers:
    """Named views carved out of one flat buffer, each 16-byte aligned (kernels specialize on it): numpy views
    of the host buffer to fill, torch views of the device buffer to read."""

    def __init__(self, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]], device: torch.device):
        offsets, n = {}, 0
        for name, shape in shapes.items():
            offsets[name] = n
            n += -(-math.prod(shape) // 4) * 4
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(n, dtype=dtype, pin_memory=on_gpu)
        self.device = torch.zeros(n, dtype=dtype, device=device) if on_gpu else self.host
        flat = self.host.numpy()
        for name, shape in shapes.items():
            size = math.prod(shape)
            setattr(self, name, flat[offsets[name] : offsets[name] + size].reshape(shape))
        self.views = {
            name: self.device[offsets[name] : offsets[name] + math.prod(shape)].view(shape)
            for name, shape in shapes.items()
        }

    def upload(self) -> None:
        if self.device is not self.host:
            self.device.copy_(self.host, non_blocking=True)


def extend_runs(runs: list[list[int]], slot: int, start: int, n: int) -> None:
    """Adds n rows of `slot` at `start` to runs [slot, start, rows] of rows grouped by slot."""
    if runs and runs[-1][0] == slot:
        runs[-1][2] += n
    else:
        runs.append([slot, start, n])


def segments(
    v: dict, prefix: str, token_slots, sorted_tokens, runs: list, first: int | None, rows: int = 0
) -> Segments:
    """rows: a fixed step's, its segment arrays then span every slot and the grids `rows` tokens."""
    n = v[prefix + "slots"].shape[0] if rows else len(runs)
    slots, starts, lens = (v[prefix + k][:n] for k in SEG)
    host = tuple(map(tuple, runs))
    return Segments(token_slots, sorted_tokens, slots, starts, lens, rows or max(r[2] for r in runs), host, first)


class InputBatch:
    def __init__(
        self,
        *,
        max_tokens: int,
        max_seqs: int,
        max_blocks: int,
        num_slots: int,
        block_size: int,
        device: torch.device,
        ops: lora_ops.LoRAOps,
        paged_kernel: bool,
        lora_on_output: bool,
    ):
        self.max_tokens, self.max_seqs, self.block_size = max_tokens, max_seqs, block_size
        self.max_blocks = -(-max_blocks // 4) * 4
        self.ops, self.paged_kernel, self.lora_on_output = ops, paged_kernel, lora_on_output
        t, b, s = max_tokens, max_seqs, num_slots
        self.long = Buffers(
            torch.int64, {"ids": (t,), "positions": (t,), "rows": (t,), "last": (b,), "decode_idx": (b,)}, device
        )
        self.int = Buffers(
            torch.int32,
            {
                "token_slots": (t,),
                "sorted": (t,),  # the adapter tokens' indices: from the first one on (kernels want 16-byte alignment)
                **{f"seg_{k}": (s,) for k in SEG},  # each adapter's run of tokens
                "last_slots": (b,),
                "last_sorted": (b,),
                **{f"last_seg_{k}": (s,) for k in SEG},
                "decode_tables": (b, self.max_blocks),
                "decode_lens": (b,),
                "chunk_tables": (b, self.max_blocks),
                **{f"chunk_{k}": (b,) for k in CHUNK},
            },
            device,
        )
        self.arange = torch.arange(max(t, max_blocks * block_size), device=device)

    def build(self, work: list[SeqWork], fixed: bool = False) -> StepBatch:
        """fixed: a decode step shaped for replay (a CUDA graph): whatever its mix of adapters, the LoRA
        segments span every slot (unused ones with no tokens) and grids every token; block tables are
        `max_blocks` wide. Its tensors then depend on the number of sequences alone."""
        assert 0 < len(work) <= self.max_seqs, (len(work), self.max_seqs)
        assert not fixed or all(len(w.tokens) == 1 and w.sample for w in work), "fixed: decode steps only"
        lg, it, bs = self.long, self.int, self.block_size
        starts = [0] * len(work)
        runs: list[list[int]] = []  # [slot, start among the adapter tokens, tokens]
        first, decode, chunks, t = None, [], [], 0
        for i in sorted(range(len(work)), key=lambda i: work[i].slot):
            w = work[i]
            n, starts[i] = len(w.tokens), t
            assert t + n <= self.max_tokens and len(w.table) <= self.max_blocks, (t + n, len(w.table))
            if n == 1:
                p = w.cached
                lg.ids[t], lg.positions[t], lg.rows[t] = w.tokens[0], p, w.table[p // bs] * bs + p % bs
                it.decode_tables[len(decode), : len(w.table)] = w.table
                decode.append((t, w.cached + 1, len(w.table)))
            else:
                pos = np.arange(w.cached, w.cached + n)
                lg.ids[t : t + n], lg.positions[t : t + n] = w.tokens, pos
                lg.rows[t : t + n] = np.asarray(w.table)[pos // bs] * bs + pos % bs
                it.chunk_tables[len(chunks), : len(w.table)] = w.table
                chunks.append((t, n, w.cached + n, len(w.table)))
            it.token_slots[t : t + n] = w.slot
            if w.slot >= 0:
                first = t if first is None else first
                extend_runs(runs, w.slot, t - first, n)
            t += n
        sampled = [i for i, w in enumerate(work) if w.sample]
        lg.last[: len(sampled)] = [starts[i] + len(work[i].tokens) - 1 for i in sampled]
        if decode:
            lg.decode_idx[: len(decode)] = [d[0] for d in decode]
            it.decode_lens[: len(decode)] = [d[1] for d in decode]
        fill(it, "chunk_", CHUNK, [c[:3] for c in chunks])
        fill(it, "seg_", SEG, runs)
        if first is not None:
            it.sorted[: t - first] = np.arange(first, t)
        last_runs = self._last_segments([work[i].slot for i in sampled]) if self.lora_on_output else []
        if fixed:
            it.seg_lens[len(runs) :] = 0
            it.last_seg_lens[len(last_runs) :] = 0
        lg.upload()
        it.upload()

        v = {**lg.views, **it.views}
        if fixed:
            tokens = segments(v, "seg_", v["token_slots"][:t], v["sorted"][:t], runs, None, t)
            last = None
            if self.lora_on_output:
                last = segments(v, "last_seg_", v["last_slots"][:t], v["last_sorted"][:t], last_runs, None, t)
            lora = LoRAStep(self.ops.rows(tokens, True), self.ops.rows(last, True), t, t)
        else:
            lora = LoRAStep(
                self.ops.rows(self._segments(v, t, first, runs)),
                self.ops.rows(self._last(v, len(sampled), last_runs)),
                t,
                len(sampled),
            )
        spans = tuple((starts[i], len(w.tokens), max(w.length, w.cached + len(w.tokens))) for i, w in enumerate(work))
        attention = AttentionMeta(
            v["rows"][:t],
            self._decode(v, decode, fixed),
            self._prefills(v, chunks) if chunks and not self.paged_kernel else (),
            self._chunks(v, chunks) if chunks and self.paged_kernel else None,
        )
        last_rows = v["last"][: len(sampled)]
        return StepBatch(v["ids"][:t], v["positions"][:t], attention, last_rows, lora, spans, fixed)

    def _segments(self, v: dict, t: int, first: int | None, runs: list) -> Segments | None:
        if first is None:
            return None
        return segments(v, "seg_", v["token_slots"][:t], v["sorted"][: t - first], runs, first)

    def _last_segments(self, slots: list[int]) -> list[tuple[int, int, int]]:
        """Runs of the sampled rows by slot (the output layer sees them in `work` order, not laid out)."""
        it = self.int
        it.last_slots[: len(slots)] = slots
        order = sorted((s, i) for i, s in enumerate(slots) if s >= 0)
        it.last_sorted[: len(order)] = [i for _, i in order]
        runs: list[list[int]] = []
        for k, (s, _) in enumerate(order):
            extend_runs(runs, s, k, 1)
        fill(it, "last_seg_", SEG, runs)
        return [tuple(r) for r in runs]

    def _last(self, v: dict, num: int, runs: list) -> Segments | None:
        if not runs:
            return None
        rows = sum(r[2] for r in runs)
        return segments(v, "last_seg_", v["last_slots"][:num], v["last_sorted"][:rows], runs, None)

    def _decode(self, v: dict, decode: list[tuple[int, int, int]], fixed: bool) -> DecodeMeta | None:
        """decode: (its token in the step, keys after the step, blocks) per decode sequence."""
        if not decode:
            return None
        b = len(decode)
        width = self.max_blocks if fixed else max(d[2] for d in decode)
        tables, lens = v["decode_tables"][:b, :width], v["decode_lens"][:b]
        if self.paged_kernel:
            return DecodeMeta(v["decode_idx"][:b], tables, lens, None)
        # the CPU path gathers each sequence's keys: their cache rows, padding -> row 0, and which it sees
        pos = self.arange[: max(d[1] for d in decode)]
        history = tables.long().gather(1, (pos // self.block_size).expand(b, -1)) * self.block_size
        seen = pos < lens[:, None]
        history = torch.where(seen, history + pos % self.block_size, 0)
        return DecodeMeta(v["decode_idx"][:b], tables, lens, history, seen[:, None])

    def _prefills(self, v: dict, chunks: list[tuple[int, int, int, int]]) -> tuple[PrefillMeta, ...]:
        """The CPU path's: each chunk's keys by their cache rows, when some were cached before it."""
        out, bs = [], self.block_size
        for j, (start, n, kv_len, _) in enumerate(chunks):
            rows = None
            if kv_len > n:
                table = v["chunk_tables"][j, : -(-kv_len // bs)].long()
                rows = (table[:, None] * bs + self.arange[:bs]).view(-1)[:kv_len]
            out.append(PrefillMeta(start, n, kv_len, rows))
        return tuple(out)

    def _chunks(self, v: dict, chunks: list[tuple[int, int, int, int]]) -> ChunksMeta:
        """chunks: (first token in the step, tokens fed, keys after the step, blocks) per prompt chunk."""
        b = len(chunks)
        columns = (v["chunk_" + k][:b] for k in CHUNK)
        tables = v["chunk_tables"][:b, : max(c[3] for c in chunks)]
        return ChunksMeta(tables, *columns, max(c[1] for c in chunks))
