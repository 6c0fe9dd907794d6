"""Adapters merged into a model's weights: W += s·B·A, or DoRA's W = g ⊙ (W + s·B·A) by output row, in
float32 (merged export and hybrid serving both use it)."""

from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from backend.lora.adapters import Adapter, AdapterStore, RowNorms
from backend.lora.layers import layer_dims


def out_rows(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [d_out, d_in] (a view: Conv1D stores it transposed)."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def dense_norms(model: nn.Module) -> RowNorms:
    """‖W + B·A‖ per output row, as PEFT's DoRA computes it, from the model's dense weights."""

    def norms(module: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(out_rows(model.get_submodule(module)).float() + b @ a, dim=1)

    return norms


def read_adapter(model: nn.Module, folder: Path) -> Adapter:
    """The adapter in `folder`, checked against every linear layer of the model."""
    linear = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    shapes = {n: layer_dims(m) for n, m in linear.items()}
    names = [n for n, _ in model.named_modules() if n]
    max_rank = max(max(s) for s in shapes.values())
    store = AdapterStore(folder.parent, shapes, names, max_rank, norms=dense_norms(model))
    return store.load(folder.name)


def merge(model: nn.Module, adapter: Adapter) -> None:
    """W += s·B·A (DoRA: W = g ⊙ (W + s·B·A) by output row) in place for each of the adapter's layers,
    computed in float32."""
    tied = {model.get_input_embeddings().weight.data_ptr()}
    with torch.no_grad():
        for name, m in adapter.modules.items():
            layer = model.get_submodule(name)
            if layer.weight.data_ptr() in tied:
                raise ValueError(f"'{name}' shares its weight with the input embeddings: merging would change both")
            merged = out_rows(layer).float() + (m.b.float() @ m.a.float()) * m.scale  # [d_out, d_in]
            if m.g is not None:
                merged *= m.g[:, None]
            out_rows(layer).copy_(merged)
