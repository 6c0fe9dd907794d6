"""Hybrid serving (deployment option 3): one adapter h merged into the served weights at load,
W' = W + s_h·B_h·A_h (`merged_loras`). Its requests run on the weights alone. Every other request gets
its own delta minus h's, as the mix `x:1,h:-1` (PEFT's cat with weights [1, -1], rank r_x + r_h), and a
base request gets `h:-1`. Exact in float32 only: in 16-bit weights round(W + Δ) - Δ is not W, so the
setting is refused there rather than serving base outputs that differ. The merged version is fixed at load:
every request subtracts that one, whatever its folder holds later."""

from pathlib import Path

import torch
from torch import nn

from backend.lora.adapters import Adapter
from backend.lora.layers import linear_modules
from backend.model.weights import merge, read_adapter
from backend.naming import lora_key, parse_mix


def served_as(name: str, merged: str) -> str:
    """The adapter or mix that serves a request for `name` ("" = the base) on weights with `merged` in
    them; "" = the weights alone."""
    return shifted(name, merged, -1.0)


def requested_as(served: str, merged: str) -> str:
    """The inverse of served_as: the adapter or mix a request served by `served` named ("" = the base)."""
    requested = shifted(served, merged, 1.0)
    parts = parse_mix(requested)
    return parts[0][0] if parts and len(parts) == 1 and parts[0][1] == 1.0 else requested


def shifted(name: str, adapter: str, by: float) -> str:
    """`name` (an adapter, a mix, or "" for the base) with `by` added to `adapter`'s weight."""
    parts = dict(parse_mix(name) or ([(name, 1.0)] if name else []))
    parts[adapter] = parts.get(adapter, 0.0) + by
    kept = [f"{a}:{w!r}" for a, w in parts.items() if w != 0.0]
    return lora_key(",".join(kept)) if kept else ""


def merge_at_load(model: nn.Module, folder: Path, targets, max_rank: int) -> Adapter:
    """Merges the adapter in `folder` into the model's weights, before its layers are wrapped, and returns
    it: the version the other requests must subtract. Refuses what would make them inexact or unservable."""
    if model.dtype != torch.float32:
        raise ValueError(
            f"merged_loras needs dtype float32: in {str(model.dtype).removeprefix('torch.')}, W + Δ rounds, and "
            "base requests (served as W + Δ - Δ) would not get the base model's outputs"
        )
    adapter = read_adapter(model, folder)
    if adapter.dora:
        raise ValueError(
            f"merged_loras '{folder.name}' is a DoRA adapter: its merged weights g ⊙ (W + Δ) leave no LoRA delta "
            "that gives the base back"
        )
    capable = linear_modules(model, targets)
    outside = sorted(set(adapter.modules) - set(capable))
    if outside:
        raise ValueError(f"merged_loras '{folder.name}' targets {outside[0]}, which lora_target_modules leaves out")
    rank = max(m.rank for m in adapter.modules.values())
    if rank > max_rank:
        raise ValueError(f"merged_loras '{folder.name}' has rank {rank}, above max_lora_rank {max_rank}")
    merge(model, adapter)
    return adapter
