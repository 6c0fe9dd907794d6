"""Merged export (deployment option 1): a model folder whose weights are the base's plus one adapter's
deltas, W + s·B·A (DoRA: g ⊙ (W + s·B·A), row-wise), in float32. It is served like any base model, with
no LoRA cost.

    python -m backend.merge --base DIR --adapter DIR --out DIR [--dtype auto|float32|float16|bfloat16]

The adapter is read and checked as the server reads it (backend/lora/adapters.py): what the server refuses,
this refuses with the same message. The tokenizer and every other file of the base folder are copied."""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from backend.errors import RequestError
from backend.model.checks import check_config
from backend.model.weights import merge, read_adapter

DTYPES = ("auto", "float32", "float16", "bfloat16")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
INFO_FILE = "merged_lora.json"


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
