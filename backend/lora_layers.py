"""LoRA-capable layers: each wraps one base linear layer and owns its stacked adapter slots."""

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from backend import lora_ops
from backend.adapters import select_targets


@dataclass
class LoRAContext:
    """Shared by every layer of a model; the engine sets `batch` and `last` before each forward."""

    ops: lora_ops.LoRAOps
    batch: lora_ops.Segments | None = None  # over every token of the step
    last: lora_ops.Segments | None = None  # over each sequence's last token (the output layer sees only those)
    layers: dict[str, "LoRALinear"] = field(default_factory=dict)

    def batch_for(self, num_tokens: int) -> lora_ops.Segments | None:
        batch = self.batch
        return batch if batch is None or batch.num_tokens == num_tokens else self.last


class LoRALinear(nn.Module):
    """y = base(x) + s_i * B_i A_i x, where i is the slot of x's request."""

    def __init__(self, base: nn.Module, ctx: LoRAContext, num_slots: int, max_rank: int):
        super().__init__()
        self.base_layer = base
        self.ctx = ctx
        weight = base.weight
        # Conv1D (GPT-2) stores weight as [d_in, d_out] (PEFT's fan_in_fan_out); nn.Linear as [d_out, d_in].
        self.d_in, self.d_out = weight.shape if isinstance(base, Conv1D) else weight.shape[::-1]
        self.w = lora_ops.SlotWeights.allocate(
            num_slots, max_rank, self.d_in, [self.d_out], weight.dtype, weight.device
        )

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        self.w.set(slot, 0, a, b, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        batch = self.ctx.batch_for(x.numel() // self.d_in)
        if batch is not None:
            self.ctx.ops.add(y.view(-1, self.d_out), x.reshape(-1, self.d_in), self.w, batch)
        return y


def linear_modules(model: nn.Module, targets="all-linear") -> dict[str, nn.Module]:
    """Linear / Conv1D layers chosen by the server's `lora_target_modules` (PEFT's target_modules
    rules: "all-linear" leaves out the output layer)."""
    out_layer = model.get_output_embeddings()
    linear = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    chosen = select_targets(targets, list(linear), {n for n, m in linear.items() if m is not out_layer})
    return {n: linear[n] for n in linear if n in chosen}


def wrap_model(model: nn.Module, targets, num_slots: int, max_rank: int, ops: lora_ops.LoRAOps) -> LoRAContext:
    """Replaces each chosen linear layer by a LoRALinear in place; returns the shared context."""
    ctx = LoRAContext(ops)
    for name, module in linear_modules(model, targets).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, ctx, num_slots, max_rank)
        setattr(parent, child, layer)
        ctx.layers[name] = layer
    return ctx
