"""LoRA-capable layers: each wraps one base linear layer and owns its stacked adapter slots."""

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from backend import lora_ops
from backend.adapters import select_targets


@dataclass
class LoRAContext:
    """Shared by every layer of a model; the engine sets `batch` before each forward."""

    batch: lora_ops.LoRABatch | None = None  # over every token of the step
    last: lora_ops.LoRABatch | None = None  # over each sequence's last token (the output layer sees only those)
    layers: dict[str, "LoRALinear"] = field(default_factory=dict)

    def batch_for(self, num_tokens: int) -> lora_ops.LoRABatch | None:
        batch = self.batch
        return batch if batch is None or batch.num_tokens == num_tokens else self.last


class LoRALinear(nn.Module):
    """y = base(x) + s_i * B_i A_i x, where i is the slot of x's request.

    Slots: a[S, r_max, d_in], b[S, d_out, r_max]; rank 0 means the adapter in that slot does not
    target this layer.
    """

    def __init__(self, base: nn.Module, ctx: LoRAContext, num_slots: int, max_rank: int):
        super().__init__()
        self.base_layer = base
        self.ctx = ctx
        weight = base.weight
        # Conv1D (GPT-2) stores weight as [d_in, d_out] (PEFT's fan_in_fan_out); nn.Linear as [d_out, d_in].
        self.d_in, self.d_out = weight.shape if isinstance(base, Conv1D) else weight.shape[::-1]
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, self.d_in, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, self.d_out, max_rank, **kw), persistent=False)
        self.ranks = [0] * num_slots
        self.scales = [0.0] * num_slots

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        if a is None:
            self.ranks[slot], self.scales[slot] = 0, 0.0
            return
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a)
        self.lora_b[slot, :, :r].copy_(b)
        self.lora_a[slot, r:].zero_()
        self.lora_b[slot, :, r:].zero_()
        self.ranks[slot], self.scales[slot] = r, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        batch = self.ctx.batch_for(x.numel() // self.d_in)
        if batch is not None:
            lora_ops.add_lora(
                y.view(-1, self.d_out),
                x.reshape(-1, self.d_in),
                self.lora_a,
                self.lora_b,
                self.ranks,
                self.scales,
                batch,
            )
        return y


def linear_modules(model: nn.Module, targets="all-linear") -> dict[str, nn.Module]:
    """Linear / Conv1D layers chosen by the server's `lora_target_modules` (PEFT's target_modules
    rules: "all-linear" leaves out the output layer)."""
    out_layer = model.get_output_embeddings()
    linear = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    chosen = select_targets(targets, list(linear), {n for n, m in linear.items() if m is not out_layer})
    return {n: linear[n] for n in linear if n in chosen}


def wrap_model(model: nn.Module, targets, num_slots: int, max_rank: int) -> LoRAContext:
    """Replaces each chosen linear layer by a LoRALinear in place; returns the shared context."""
    ctx = LoRAContext()
    for name, module in linear_modules(model, targets).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, ctx, num_slots, max_rank)
        setattr(parent, child, layer)
        ctx.layers[name] = layer
    return ctx
