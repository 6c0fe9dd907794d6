"""Runs a Hugging Face causal LM on a flat batch of tokens from many sequences.

All tokens of a step (prefill chunks and decode tokens of every running sequence) go through the
model as one row [1, T], so each linear layer, and its LoRA deltas, sees the whole mixed batch at
once. Attention is ours: it writes each token's K/V into that sequence's row of a preallocated
cache and attends within the sequence. Works for any model that calls transformers' attention
interface (Llama, Mistral, Qwen2, GPT-2, ...).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM

from backend import dense, lora_ops
from backend.config import context_length
from backend.lora_layers import LoRAContext, LoRALinear, LoRAStep, wrap_model

ATTENTION = "lora_engine"


@dataclass(frozen=True)
class SeqSlice:
    row: int  # KV-cache row of the sequence
    start: int  # first of its tokens in the flat batch
    length: int  # tokens it feeds this step
    kv_len: int  # cached tokens after this step


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    rows: torch.Tensor  # [T] cache row of each token
    seqs: tuple[SeqSlice, ...]  # in the order given; their tokens are laid out by LoRA slot
    last: torch.Tensor  # [B] index of each sequence's last token: where logits are taken
    lora: LoRAStep  # which tokens use which adapter slot
    decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # single-token sequences: token, row, kv_len


def make_step(
    seqs: list[tuple[int, list[int], int, int]], device, ops: lora_ops.LoRAOps, lora_on_output: bool = False
) -> StepBatch:
    """seqs: (cache row, tokens to feed, tokens already cached, lora slot or -1) per sequence.
    What every layer needs is built here, once per step. Tokens are laid out base-model sequences
    first, then by slot, so that each adapter's tokens are one run (logits come back in `seqs` order)."""
    slices: list[SeqSlice | None] = [None] * len(seqs)
    ids, pos, rows, slots = [], [], [], []
    for i in sorted(range(len(seqs)), key=lambda i: seqs[i][3]):
        row, tokens, cached, slot = seqs[i]
        slices[i] = SeqSlice(row, len(ids), len(tokens), cached + len(tokens))
        ids += tokens
        pos += range(cached, cached + len(tokens))
        rows += [row] * len(tokens)
        slots += [slot] * len(tokens)
    as_long = {"dtype": torch.long, "device": device}
    last = [s.start + s.length - 1 for s in slices]
    decode = [s for s in slices if s.length == 1]
    last_slots = torch.tensor([slots[i] for i in last], device=device)
    lora = LoRAStep(
        ops.rows(lora_ops.sorted_segments(slots, device)),
        ops.rows(lora_ops.segment_tokens(last_slots)) if lora_on_output else None,
        len(ids),
        len(last),
    )
    return StepBatch(
        torch.tensor(ids, **as_long),
        torch.tensor(pos, **as_long),
        torch.tensor(rows, **as_long),
        tuple(slices),
        torch.tensor(last, **as_long),
        lora,
        tuple(torch.tensor(v, **as_long) for v in zip(*((s.start, s.row, s.kv_len) for s in decode))) or None,
    )


class LayerKV:
    """K/V cache of one attention layer: [rows, kv_heads, max_len, head_dim], allocated on first use."""

    def __init__(self, runner: "ModelRunner"):
        self.runner = runner
        self.k = self.v = None

    def attend(self, q, k, v, scaling, window) -> torch.Tensor:
        # q: [1, Hq, T, D]; k, v: [1, Hkv, T, D] for the new tokens -> [1, T, Hq, D]
        step = self.runner.step
        if self.k is None:
            shape = (self.runner.max_seqs, k.shape[1], self.runner.max_len, k.shape[3])
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros_like(self.k)
        self.k[step.rows, :, step.positions] = k[0].transpose(0, 1)
        self.v[step.rows, :, step.positions] = v[0].transpose(0, 1)
        out = torch.empty(1, q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device)
        if step.decode:
            self._decode(q, out, step.decode, scaling, window)
        for s in step.seqs:
            if s.length > 1:
                self._prefill(q, out, s, scaling, window)
        return out

    def _decode(self, q, out, decode, scaling, window):
        # One attention call for every single-token sequence, keys padded to the longest.
        idx, rows, lens = decode
        n = int(lens.max())
        keys = torch.arange(n, device=q.device)
        mask = keys[None, :] < lens[:, None]
        if window:
            mask &= keys[None, :] > lens[:, None] - 1 - window
        qd = q[0, :, idx].transpose(0, 1).unsqueeze(2)  # [B, Hq, 1, D]
        o = F.scaled_dot_product_attention(
            qd, self.k[rows, :, :n], self.v[rows, :, :n], attn_mask=mask[:, None, None], scale=scaling, enable_gqa=True
        )
        out[0, idx] = o[:, :, 0]

    def _prefill(self, q, out, s: SeqSlice, scaling, window):
        qs = q[:, :, s.start : s.start + s.length]
        k, v = self.k[s.row : s.row + 1, :, : s.kv_len], self.v[s.row : s.row + 1, :, : s.kv_len]
        if s.kv_len == s.length and not (window and s.kv_len > window):
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            qpos = torch.arange(s.kv_len - s.length, s.kv_len, device=q.device)[:, None]
            kpos = torch.arange(s.kv_len, device=q.device)[None, :]
            mask = (kpos <= qpos) & ((qpos - kpos < window) if window else True)
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        out[0, s.start : s.start + s.length] = o[0].transpose(0, 1)


def engine_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    return module.lora_kv.attend(query, key, value, scaling, sliding_window), None


AttentionInterface.register(ATTENTION, engine_attention)


class ModelRunner:
    """Owns the model, its LoRA layers and KV cache; `forward` gives next-token logits per sequence."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: torch.dtype,
        device: str,
        max_seqs: int,
        max_len: int,
        num_slots: int,
        max_rank: int,
        targets="all-linear",
        lora_backend: str = "auto",
    ):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=ATTENTION)
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.config = self.model.config
        self.max_len = context_length(self.config.to_dict(), max_len)
        self.max_seqs = max_seqs
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.module_names = [n for n, _ in self.model.named_modules() if n]
        ops = lora_ops.LoRAOps(lora_backend, self.device)
        self.lora: LoRAContext = wrap_model(self.model, targets, num_slots, max_rank, ops)
        self.shapes = {n: (layer.d_in, layer.d_out) for n, layer in self.lora.layers.items()}
        if self.device.type == "cpu" and dense.packing_works(self.model.dtype):
            for group in self.lora.groups:
                group.replace_linear(dense.PackedLinear(group.linear))
            embeddings = (m for m in self.model.modules() if isinstance(m, torch.nn.Embedding))
            dense.pack_linears(self.model, {m.weight.data_ptr() for m in embeddings})
            dense.own_memory(self.model)
        self.lora_on_output = isinstance(self.model.get_output_embeddings(), LoRALinear)
        self.step: StepBatch | None = None
        attention = [m for m in self.model.modules() if hasattr(m, "layer_idx") and getattr(m, "is_causal", False)]
        if not attention:
            raise ValueError(f"{type(self.model).__name__}: no attention layer uses transformers' attention interface")
        for module in attention:
            module.lora_kv = LayerKV(self)

    def make_step(self, seqs: list[tuple[int, list[int], int, int]]) -> StepBatch:
        return make_step(seqs, self.device, self.lora.ops, self.lora_on_output)

    @torch.inference_mode()
    def forward(self, step: StepBatch) -> torch.Tensor:
        """-> logits [B, vocab] (fp32) at the last token of each sequence."""
        self.step, self.lora.step = step, step.lora
        try:
            out = self.model(
                input_ids=step.input_ids[None],
                position_ids=step.positions[None],
                use_cache=False,
                logits_to_keep=step.last,
            )
        finally:
            self.step = self.lora.step = None
        return out.logits[0].float()
