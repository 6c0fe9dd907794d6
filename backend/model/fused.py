"""transformers modules whose math is one torch op, swapped for that op at load: fewer ops and less Python
per layer, which is most of a step's time on a deep, thin model. Float32 only: in 16-bit the op rounds once
where transformers rounds twice (normalized, then times the weight)."""

import torch
import torch.nn.functional as F
from torch import nn

# weight * (x * rsqrt(mean(x²) + eps)), computed in float32: the same forward in each of these
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}


class RMSNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.variance_epsilon
        self.shape = tuple(norm.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)


def fuse_norms(model: nn.Module) -> int:
    """Replaces the RMS norms of RMS_NORMS by torch's rms_norm in a float32 model; -> how many."""
    if model.dtype != torch.float32:
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in RMS_NORMS:
                setattr(parent, name, RMSNorm(child))
                count += 1
    return count
