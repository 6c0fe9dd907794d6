"""LoRA-capable layers: each wraps one base linear layer and owns its stacked adapter slots (or, for
q/k/v and gate/up, shares its group's)."""

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from backend.lora import ops as lora_ops
from backend.lora.adapters import select_targets


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out): Conv1D (GPT-2) stores weight as [d_in, d_out] (PEFT's fan_in_fan_out), nn.Linear as
    [d_out, d_in]."""
    return tuple(layer.weight.shape if isinstance(layer, Conv1D) else layer.weight.shape[::-1])


@dataclass(frozen=True)
class LoRAStep:
    """Which tokens of a step use which slot: every layer sees all `num_tokens` tokens of the step,
    except the output layer, which sees each sequence's last token (`num_last`)."""

    tokens: lora_ops.Rows | None  # None: no token of the step has an adapter
    last: lora_ops.Rows | None
    num_tokens: int
    num_last: int


@dataclass
class LoRAContext:
    """Shared by every layer of a model; the model runner sets `step` around each forward."""

    ops: lora_ops.LoRAOps
    step: LoRAStep | None = None
    layers: dict[str, "LoRALinear"] = field(default_factory=dict)
    groups: list["LoRAGroup"] = field(default_factory=list)

    def row_norms(self, module: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """‖W + B·A‖ per output row of a layer, for DoRA (adapters.RowNorms)."""
        return self.layers[module].row_norms(a, b)

    def rows(self, layer: "LoRALinear", x: torch.Tensor) -> lora_ops.Rows | None:
        """The step's LoRA rows for the tokens in x; raises where x is not what the step says."""
        step = self.step
        if step is None:
            raise RuntimeError(f"LoRA layer {layer.name} called outside an engine step")
        n = x.numel() // layer.d_in
        expected, rows = (step.num_last, step.last) if layer.is_output else (step.num_tokens, step.tokens)
        if n != expected:
            raise RuntimeError(f"LoRA layer {layer.name} got {n} tokens; the step has {expected} for it")
        return rows


class LoRALinear(nn.Module):
    """y = base(x) + s_i * B_i A_i x, where i is the slot of x's request (DoRA: g_i ⊙ (W x + s_i B_i A_i x)
    + bias). A layer in a LoRAGroup keeps its slice of the group's slots and gets its output from the group."""

    def __init__(self, base: nn.Module, ctx: LoRAContext, name: str, is_output: bool = False):
        super().__init__()
        self.base_layer = base
        self.ctx = ctx
        self.name = name
        self.is_output = is_output  # the output layer sees only each sequence's last token
        self.d_in, self.d_out = layer_dims(base)
        with torch.no_grad():  # ‖W‖² per output row, kept for DoRA: the dense weight may be packed away
            rows = 0 if isinstance(base, Conv1D) else 1
            self.weight_sq = torch.linalg.vector_norm(base.weight, dim=rows, dtype=torch.float32).square()
        self.w: lora_ops.SlotWeights | None = None  # set by wrap_model: its own, or its group's
        self.slice = 0
        self.group: LoRAGroup | None = None

    def set_slot(self, slot: int, a, b, scale: float, g: torch.Tensor | None = None) -> None:
        self.w.set(slot, self.slice, a, b, scale, g)

    def allocate(self, num_slots: int, max_rank: int) -> None:
        weight = self.base_layer.weight
        self.w = lora_ops.SlotWeights.allocate(
            num_slots, max_rank, self.d_in, [self.d_out], weight.dtype, weight.device, self.base_layer.bias
        )

    @torch.no_grad()
    def row_norms(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """‖W + B·A‖ per output row (a [r, d_in], b [d_out, r] fp32) as ‖W‖² + 2·(W·Aᵀ ⊙ B)·1 + ‖B·A‖², with
        W·Aᵀ from the base layer itself (dense, grouped or packed): one small product, no copy of W."""
        linear = self.base_layer if self.group is None else self.group.linear
        a, b = a.to(self.weight_sq.device), b.to(self.weight_sq.device)
        wa = linear(a.to(self.w.a.dtype)).float()  # [r, N]: A·Wᵀ + bias
        cols = slice(self.w.starts[self.slice], self.w.starts[self.slice] + self.d_out)
        wa = wa[:, cols] - (0.0 if self.w.bias is None else self.w.bias[cols])
        sq = self.weight_sq + 2 * (wa.T * b).sum(1) + ((b @ (a @ a.T)) * b).sum(1)
        return sq.clamp_min(0).sqrt().cpu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.output(self, x)
        y = self.base_layer(x)
        batch = self.ctx.rows(self, x)
        if batch is not None:
            self.ctx.ops.add(y.view(-1, self.d_out), x.reshape(-1, self.d_in), self.w, batch)
        return y


class LoRAGroup:
    """Sibling layers that read the same input (q/k/v, gate/up): one GEMM over their concatenated
    weights (the members' weights become views of it: still in memory once), one shrink and one
    expand over all their LoRA slices. The first member called computes every member's output;
    the others, called with the same input tensor, get their columns of it."""

    def __init__(self, members: list[LoRALinear], num_slots: int, max_rank: int):
        bases = [m.base_layer for m in members]
        self.members, self.ctx = members, members[0].ctx
        weight = torch.cat([b.weight.data for b in bases])  # [N, d_in]
        bias = torch.cat([b.bias.data for b in bases]) if bases[0].bias is not None else None
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, weight.device, weight.dtype)
        self.linear.weight.data = weight
        if bias is not None:
            self.linear.bias.data = bias
        widths = [m.d_out for m in members]
        self.w = lora_ops.SlotWeights.allocate(
            num_slots, max_rank, members[0].d_in, widths, weight.dtype, weight.device, bias
        )
        for i, (m, base) in enumerate(zip(members, bases)):
            rows = slice(self.w.starts[i], self.w.starts[i] + widths[i])
            base.weight.data = weight[rows]
            if bias is not None:
                base.bias.data = bias[rows]
            m.group, m.slice, m.w = self, i, self.w
        self._x = self._y = None
        self._served = 0
        self.ctx.groups.append(self)

    def replace_linear(self, linear: nn.Module) -> None:
        """Computes the group's GEMM with `linear` (e.g. packed) and lets go of the dense weights."""
        self.linear = linear
        for m in self.members:
            m.base_layer.weight = m.base_layer.bias = None

    @staticmethod
    def fusable(members: list[LoRALinear]) -> bool:
        bases = [m.base_layer for m in members]
        return (
            all(type(b) is nn.Linear for b in bases)
            and len({(m.d_in, b.weight.dtype, b.weight.device, b.bias is None) for m, b in zip(members, bases)}) == 1
        )

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output, their columns side by side: [..., d_in] -> [..., N]."""
        y = self.linear(x)
        batch = self.ctx.rows(self.members[0], x)
        if batch is not None:
            self.ctx.ops.add(y.view(-1, y.shape[-1]), x.reshape(-1, self.members[0].d_in), self.w, batch)
        return y

    def output(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x:
            self._x, self._y, self._served = x, self.forward_all(x), 0
        start = self.w.starts[member.slice]
        out = self._y[..., start : start + member.d_out]
        self._served += 1
        if self._served == len(self.members):  # every member has its part: let go of the step's tensors
            self._x = self._y = None
        return out


# Siblings fused into one group when all are LoRA layers over the same input.
GROUPS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]


def linear_modules(model: nn.Module, targets="all-linear") -> dict[str, nn.Module]:
    """Linear / Conv1D layers chosen by the server's `lora_target_modules` (PEFT's target_modules
    rules: "all-linear" leaves out the output layer)."""
    out_layer = model.get_output_embeddings()
    linear = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    chosen = select_targets(targets, list(linear), {n for n, m in linear.items() if m is not out_layer})
    return {n: linear[n] for n in linear if n in chosen}


def wrap_model(
    model: nn.Module, targets, num_slots: int, max_rank: int, ops: lora_ops.LoRAOps, fuse: bool = True
) -> LoRAContext:
    """Replaces each chosen linear layer by a LoRALinear in place, and groups q/k/v and gate/up
    siblings (fuse=True); returns the shared context."""
    ctx = LoRAContext(ops)
    out_layer = model.get_output_embeddings()
    for name, module in linear_modules(model, targets).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, ctx, name, is_output=module is out_layer)
        setattr(parent, child, layer)
        ctx.layers[name] = layer
    if fuse:
        for parent in model.modules():
            for names in GROUPS:
                members = [getattr(parent, n, None) for n in names]
                if all(isinstance(m, LoRALinear) for m in members) and LoRAGroup.fusable(members):
                    LoRAGroup(members, num_slots, max_rank)
    for layer in ctx.layers.values():
        if layer.w is None:
            layer.allocate(num_slots, max_rank)
    return ctx
