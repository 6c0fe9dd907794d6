"""Attention over the paged KV cache for a flat batch of tokens from many sequences.

Every token's K/V is written to its cache row first. On a GPU (paged_kernel) two kernels read K/V where
they lie: the paged prefill kernel for every prompt chunk of the step at once, whatever is cached before
it, and the paged decode kernel for the decode tokens (one per sequence). On a CPU one gather of the rows
and one SDPA for the decode tokens measured fastest, and a prompt chunk attends per sequence: to its own
K/V when nothing is cached before it, else to its gathered rows (one masked call for all the chunks was
slower). Soft-capping and sinks, which SDPA lacks, take the explicit path.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Arguments models pass to the attention interface that change nothing here (positions, masks and
# caches are the engine's own), and those that change the math and are applied.
IGNORED = {"position_ids", "cache_position", "use_cache", "output_attentions", "past_key_values", "is_causal"}
APPLIED = {"dropout", "scaling", "sliding_window", "softcap", "s_aux"}


MASKED_SCORES_BYTES = 32 * 2**20  # a masked attention call's fp32 scores; longer chunks go in slices


class UnsupportedAttention(ValueError):
    pass


@dataclass(frozen=True)
class AttnArgs:
    scale: float
    softcap: float = 0.0  # 0: none
    window: int = 0  # 0: none; else the last `window` keys, the query's own included
    sinks: torch.Tensor | None = None  # [Hq] one extra logit per head in the softmax denominator

    @classmethod
    def parse(cls, name: str, head_dim: int, kwargs: dict) -> "AttnArgs":
        """Raises UnsupportedAttention for any argument that would change the result and is not applied."""
        for key, value in kwargs.items():
            if key == "is_causal" and value is False:
                raise UnsupportedAttention(f"{name}: non-causal attention is not supported")
            if key not in IGNORED | APPLIED and value is not None:
                raise UnsupportedAttention(f"{name}: the attention argument {key!r} is not supported")
        if kwargs.get("dropout"):
            raise UnsupportedAttention(f"{name}: attention dropout {kwargs['dropout']} at inference")
        scale = kwargs.get("scaling")
        return cls(
            scale=head_dim**-0.5 if scale is None else float(scale),
            softcap=float(kwargs.get("softcap") or 0.0),
            window=int(kwargs.get("sliding_window") or 0),
            sinks=None if kwargs.get("s_aux") is None else kwargs["s_aux"].detach().float(),
        )


@dataclass(frozen=True)
class DecodeMeta:
    idx: torch.Tensor  # [Bd] position of each decode token in the step
    block_tables: torch.Tensor  # [Bd, max_blocks] int32
    seq_lens: torch.Tensor  # [Bd] int32, keys in the cache including the new token
    history: torch.Tensor | None  # [Bd, n] cache rows of each sequence's keys, padding -> row 0 (CPU path)
    seen: torch.Tensor | None = None  # [Bd, 1, n] the keys each token sees, its own included (CPU path)


@dataclass(frozen=True)
class PrefillMeta:
    start: int  # first of its tokens in the step
    length: int  # tokens it feeds this step
    kv_len: int  # keys after this step
    rows: torch.Tensor | None  # [kv_len] cache rows of its keys; None when nothing was cached before


@dataclass(frozen=True)
class ChunksMeta:
    """Every prompt chunk of a step, for the paged prefill kernel."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    q_starts: torch.Tensor  # [B] int32: first token of each chunk in the step
    q_lens: torch.Tensor  # [B] int32
    kv_lens: torch.Tensor  # [B] int32: keys after this step, the chunk's own included
    max_q_len: int


@dataclass(frozen=True)
class AttentionMeta:
    slots: torch.Tensor  # [T] cache row each token's K/V is written to
    decode: DecodeMeta | None
    prefills: tuple[PrefillMeta, ...]  # the CPU path's
    chunks: ChunksMeta | None = None  # the same chunks, for the GPU's paged prefill kernel


def attend(q, k, v, args: AttnArgs, q_start: int | torch.Tensor, seen: torch.Tensor | None = None):
    """q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; query i is at position q_start + i (q_start: [B] or int) and
    sees the keys up to it (and within the window); keys past it are padding. seen: that causal mask [B, Lq, Lk]
    if the caller has it (built once a step, not in every layer). -> [B, Hq, Lq, D]"""
    lq, lk = q.shape[2], k.shape[2]
    plain = not args.softcap and args.sinks is None
    if plain and lq == lk and not (args.window and lk > args.window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=args.scale, enable_gqa=True)
    rows = max(1, MASKED_SCORES_BYTES // (q.shape[0] * q.shape[1] * lk * 4))
    if lq > rows and isinstance(q_start, int):  # a long chunk after a long prefix: bound the scores' memory
        parts = []
        for i in range(0, lq, rows):
            seen = q_start + i + rows  # keys past the slice's last query are masked anyway
            parts.append(attend(q[:, :, i : i + rows], k[:, :, :seen], v[:, :, :seen], args, q_start + i))
        return torch.cat(parts, 2)
    if seen is None or args.window:
        qpos = torch.as_tensor(q_start, device=q.device).view(-1, 1, 1) + torch.arange(lq, device=q.device)[:, None]
        kpos = torch.arange(lk, device=q.device)
        mask = kpos <= qpos  # [B or 1, Lq, Lk]
        if args.window:
            mask &= qpos - kpos < args.window
    else:
        mask = seen
    if plain:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=args.scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * args.scale
    if args.softcap:
        scores = torch.tanh(scores / args.softcap) * args.softcap
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    if args.sinks is not None:
        sink = args.sinks.view(1, -1, 1, 1).expand(scores.shape[0], -1, lq, 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return (probs @ v.float()).to(q.dtype)


class PagedAttention:
    """One layer's attention over its K/V rows of the shared cache (k_cache, v_cache: [rows, Hkv, D])."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int, paged_kernel: bool):
        self.k_cache, self.v_cache, self.block_size = k_cache, v_cache, block_size
        shape = (-1, block_size, *k_cache.shape[1:])  # the kernels' view: [num_blocks, block_size, Hkv, D]
        self.k_blocks, self.v_blocks = k_cache.view(shape), v_cache.view(shape)
        self.kernel = self.prefill_kernel = None
        if paged_kernel:
            from kernels.paged_attention import paged_decode_attention
            from kernels.paged_prefill import paged_prefill_attention

            self.kernel, self.prefill_kernel = paged_decode_attention, paged_prefill_attention

    def __call__(self, q, k, v, meta: AttentionMeta, args: AttnArgs) -> torch.Tensor:
        # transformers' layout: q [1, Hq, T, D]; k, v [1, Hkv, T, D] for the new tokens -> [1, T, Hq, D]
        return self.forward(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), meta, args)[None]

    def forward(self, q, k, v, meta: AttentionMeta, args: AttnArgs) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens -> [T, Hq, D]
        self.k_cache.index_copy_(0, meta.slots, k)
        self.v_cache.index_copy_(0, meta.slots, v)
        if meta.decode is not None and not meta.prefills and meta.chunks is None:  # all decode, in step order
            return self._decode(q, meta.decode, args)
        if meta.chunks is not None:
            return self._chunks(q, meta, args)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.decode is not None:
            out[meta.decode.idx] = self._decode(q[meta.decode.idx], meta.decode, args)
        for p in meta.prefills:
            qs = q[p.start : p.start + p.length].transpose(0, 1)[None]
            if p.rows is None:
                ks, vs = (x[p.start : p.start + p.length].transpose(0, 1)[None] for x in (k, v))
            else:
                ks, vs = (c.index_select(0, p.rows).transpose(0, 1)[None] for c in (self.k_cache, self.v_cache))
            out[p.start : p.start + p.length] = attend(qs, ks, vs, args, p.kv_len - p.length)[0].transpose(0, 1)
        return out

    def _chunks(self, q: torch.Tensor, meta: AttentionMeta, args: AttnArgs) -> torch.Tensor:
        # q: [T, Hq, D] -> [T, Hq, D]: the prompt chunks by the paged prefill kernel, then the decode tokens
        c = meta.chunks
        out = self.prefill_kernel(
            q,
            self.k_blocks,
            self.v_blocks,
            c.block_tables,
            c.q_starts,
            c.q_lens,
            c.kv_lens,
            args.scale,
            softcap=args.softcap,
            window=args.window,
            sinks=args.sinks,
            max_q_len=c.max_q_len,
        )
        if meta.decode is not None:
            out[meta.decode.idx] = self._decode(q[meta.decode.idx], meta.decode, args)
        return out

    def _decode(self, q: torch.Tensor, d: DecodeMeta, args: AttnArgs) -> torch.Tensor:
        # q: [Bd, Hq, D] -> [Bd, Hq, D]
        if self.kernel is not None:
            return self.kernel(
                q.contiguous(),
                self.k_blocks,
                self.v_blocks,
                d.block_tables,
                d.seq_lens,
                args.scale,
                softcap=args.softcap,
                window=args.window,
                sinks=args.sinks,
            )
        # index_select, not cache[history]: half the time of advanced indexing for these gathers on a CPU
        shape = (*d.history.shape, *self.k_cache.shape[1:])
        k = self.k_cache.index_select(0, d.history.view(-1)).view(shape).transpose(1, 2)  # [Bd, Hkv, n, D]
        v = self.v_cache.index_select(0, d.history.view(-1)).view(shape).transpose(1, 2)
        return attend(q[:, :, None], k, v, args, d.seq_lens.long() - 1, d.seen)[:, :, 0]
