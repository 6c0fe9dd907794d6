"""Merged export (deployment option 1): a model folder whose weights are the base's plus one adapter's
deltas, W + s·B·A (DoRA: g ⊙ (W + s·B·A), row-wise), in float32. It is served like any base model, with
no LoRA cost.

    python -m backend.merge --base DIR --adapter DIR --out DIR [--dtype auto|float32|float16|bfloat16]

The adapter is read and checked as the server reads it (backend/adapters.py): what the server refuses,
this refuses with the same message. The tokenizer and every other file of the base folder are copied."""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from backend.adapters import Adapter, AdapterStore, RowNorms
from backend.errors import RequestError
from backend.lora_layers import layer_dims
from backend.model_checks import check_config

DTYPES = ("auto", "float32", "float16", "bfloat16")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
INFO_FILE = "merged_lora.json"


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


def saved_dtype(model: nn.Module, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    saved = getattr(model.config, "dtype", None)
    return saved if isinstance(saved, torch.dtype) else getattr(torch, saved or "float32")


def export(base: Path, adapter: Path, out: Path, dtype: str = "auto") -> Path:
    base, adapter, out = Path(base), Path(adapter), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty")
    check_config(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    target = saved_dtype(model, dtype)
    lora = read_adapter(model, adapter)
    merge(model, lora)
    model.to(target).save_pretrained(out)
    for f in base.iterdir():  # the tokenizer, chat template and anything else beside the weights
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt") and f.name not in MODEL_FILES:
            shutil.copy2(f, out / f.name)
    info = {"base": str(base.resolve()), "adapter": str(adapter.resolve()), "adapter_version": lora.version}
    (out / INFO_FILE).write_text(json.dumps({**info, "dtype": str(target).removeprefix("torch.")}, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the base model folder")
    parser.add_argument("--adapter", type=Path, required=True, help="a PEFT LoRA adapter folder")
    parser.add_argument("--out", type=Path, required=True, help="the merged model folder (new or empty)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="of the saved weights (auto: the base's)")
    args = parser.parse_args(argv)
    try:
        out = export(args.base, args.adapter, args.out, args.dtype)
    except (RequestError, ValueError, OSError) as e:
        print(f"merge: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
