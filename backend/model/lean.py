"""A lean forward for the Llama family (Llama, Mistral, Qwen2): the model's own modules and weights, called
without transformers' per-layer plumbing (output capture, mask building, the attention dispatch, views
between [1, H, T, D] and [1, T, H, D], rotate_half's slices and cat). The same ops on the same values in the
same order, so the same logits; on a deep, thin model the plumbing is most of a step's time.

RoPE: rotate_half(x) * sin = [-x2, x1] * sin = x[perm] * [-sin1, sin2], with perm swapping the halves: one
gather and the sign folded into sin once a step. q and k are rotated together when they are adjacent
columns of one fused projection."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backend.lora.layers import LoRALinear

FAMILY = {
    "LlamaForCausalLM": "LlamaDecoderLayer",
    "MistralForCausalLM": "MistralDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2DecoderLayer",
}


def fits(model: nn.Module) -> bool:
    """The model is one the lean forward computes exactly as transformers does."""
    layer_type = FAMILY.get(type(model).__name__)
    inner = getattr(model, "model", None)
    if layer_type is None or inner is None or getattr(model.config, "hidden_act", None) != "silu":
        return False
    if getattr(model.config, "pretraining_tp", 1) != 1:  # Llama's tensor-parallel slicing of its linears
        return False
    return all(type(layer).__name__ == layer_type for layer in inner.layers)


def projection(module: nn.Module):
    """y = module(x) for a member of a fused LoRA group: the group's whole output, if it is the group's first."""
    if isinstance(module, LoRALinear) and module.group is not None and module.slice == 0:
        return module.group.forward_all, module.group
    return module, None


@dataclass
class LeanLayer:
    layer: nn.Module
    attention: object  # backend.model.runner.LayerAttention: its paged attention and parsed arguments
    heads: int
    kv_heads: int
    head_dim: int

    def __post_init__(self):
        attn, mlp = self.layer.self_attn, self.layer.mlp
        self.norm1, self.norm2 = self.layer.input_layernorm, self.layer.post_attention_layernorm
        self.qkv, group = projection(attn.q_proj)
        self.fused_qkv = group is not None and [m.name for m in group.members] == [
            attn.q_proj.name,
            attn.k_proj.name,
            attn.v_proj.name,
        ]
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate_up, group = projection(mlp.gate_proj)
        self.fused_mlp = group is not None and [m.name for m in group.members] == [mlp.gate_proj.name, mlp.up_proj.name]
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def __call__(self, h: torch.Tensor, rope, meta) -> torch.Tensor:
        # h: [T, hidden] -> [T, hidden]
        t, d = h.shape[0], self.head_dim
        x = self.norm1(h)
        if self.fused_qkv:
            y = self.qkv(x)  # [T, (Hq + 2 Hkv) D]
            qk = rope(y[:, : (self.heads + self.kv_heads) * d].view(t, -1, d))
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = y[:, (self.heads + self.kv_heads) * d :].view(t, self.kv_heads, d)
        else:
            q, k = rope(self.q(x).view(t, self.heads, d)), rope(self.k(x).view(t, self.kv_heads, d))
            v = self.v(x).view(t, self.kv_heads, d)
        a = self.attention.paged.forward(q, k, v, meta, self.attention.args)  # [T, Hq, D]
        h += self.o(a.reshape(t, -1))  # in place: h is this step's own (the embedding's output, then ours)
        x = self.norm2(h)
        if self.fused_mlp:
            gu = self.gate_up(x)
            gate, up = gu.split(gu.shape[1] // 2, 1)
        else:
            gate, up = self.gate(x), self.up(x)
        h += self.down(F.silu(gate, inplace=True).mul_(up))
        return h


class Rope:
    """x * cos + rotate_half(x) * sin for x [T, H, D], with one step's cos, sin [T, D]."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        half = cos.shape[-1] // 2
        self.cos = cos[:, None]
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], -1)[:, None]
        self.perm = torch.arange(2 * half, device=cos.device).roll(half)  # made on the device: no copy to capture

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.cos
        out += x.index_select(-1, self.perm).mul_(self.sin)
        return out


class LeanModel:
    """Next-token logits at the step's sampled rows, through the model's own modules."""

    def __init__(self, model: nn.Module, attention: list):
        inner, cfg = model.model, model.config
        self.embed, self.rotary, self.norm, self.head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = [
            LeanLayer(layer, att, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim)
            for layer, att in zip(inner.layers, attention, strict=True)
        ]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, meta) -> torch.Tensor:
        # input_ids, positions: [T]; last: [B] -> logits [B, vocab]
        h = self.embed(input_ids)
        cos, sin = self.rotary(h[None], positions[None])
        rope = Rope(cos[0], sin[0])
        for layer in self.layers:
            h = layer(h, rope, meta)
        return self.head(self.norm(h).index_select(0, last))
