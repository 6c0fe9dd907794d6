"""The base model's linear layers on a CPU: oneDNN with each weight packed once, at load.

torch's F.linear runs fp32 on a CPU through MKL; on the AMD EPYC machines measured here that reached
130-180 GFLOPS where oneDNN with a prepacked weight reached 330-440 (2 cores). The packed weight
replaces the dense one, so the weights stay in memory once; a weight shared with an embedding (tied
output layer) stays dense. transformers maps the safetensors file into memory and the weights are
views of that mapping: `own_memory` copies what is left dense, so that the mapping (whose pages the
packing read, and which would otherwise count a second time) goes away.
"""

import logging

import torch
from torch import nn

log = logging.getLogger("lora_engine")


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packing_works(dtype: torch.dtype) -> bool:
    """oneDNN is in this torch build and agrees with F.linear on a CPU."""
    if dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        linear = nn.Linear(96, 40, dtype=dtype)
        x = torch.randn(3, 5, 96, generator=gen, dtype=dtype)
        with torch.no_grad():
            return torch.allclose(PackedLinear(linear)(x), linear(x), rtol=1e-4, atol=1e-5)
    except (RuntimeError, AttributeError) as e:  # no such op in this build
        log.info("oneDNN packed linear unavailable: %s", e)
        return False


def pack_linears(root: nn.Module, shared: set[int]) -> int:
    """Replaces every nn.Linear below root by a PackedLinear, except those whose weight is in `shared`
    (data pointers) or gone (None). -> the number replaced."""
    count = 0
    for name, child in list(root.named_children()):
        if type(child) is not nn.Linear:
            count += pack_linears(child, shared)
        elif child.weight is not None and child.weight.data_ptr() not in shared:
            setattr(root, name, PackedLinear(child))
            count += 1
    return count


def own_memory(model: nn.Module) -> None:
    """Parameters and buffers copied out of whatever storage they share (such as a file mapping)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
