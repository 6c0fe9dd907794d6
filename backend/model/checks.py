"""Checks at load that refuse a base the engine cannot serve exactly yet, naming what gives it away."""

import json
import re
from pathlib import Path

import torch
from torch import nn

NOT_SERVED = (
    "quantized bases (FP8, AWQ, GPTQ, bitsandbytes, compressed-tensors) are not served yet: use an unquantized base"
)
# Layer classes of the quantization libraries transformers loads through (finegrained FP8, FBGEMM, AWQ, GPTQ and
# GPTQModel, bitsandbytes, compressed-tensors, HQQ, quanto, EETQ, BitNet, ...), by name and by where they live.
QUANTIZED_LAYER = re.compile(
    r".*(FP8|Fp8|FP4|Quant|Quantized)\w*Linear.*|WQLinear.*|Linear(4bit|8bitLt)|CompressedLinear|HQQLinear|QLinear|"
    r"EetqLinear|(Auto)?BitLinear"
)
QUANT_PACKAGES = re.compile(
    r"(transformers\.integrations|awq|auto_gptq|gptqmodel|bitsandbytes|compressed_tensors|hqq|optimum\.quanto|eetq|"
    r"fbgemm_gpu|torchao|aqlm|vptq)(\..*)?"
)
FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class UnsupportedModel(ValueError):
    pass


def quant_method(config: dict) -> str | None:
    """The quantization a config.json declares, if any (old bitsandbytes configs name no quant_method)."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    if quant.get("quant_method"):
        return str(quant["quant_method"])
    return "bitsandbytes" if quant.get("load_in_4bit") or quant.get("load_in_8bit") else "unknown"


def check_config(model_dir: Path) -> None:
    """Runs before from_pretrained, which would otherwise fail first on a missing quantization library."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    method = quant_method(config)
    if method:
        arch = (config.get("architectures") or [config.get("model_type") or "the model"])[0]
        raise UnsupportedModel(f"{arch}: config.json has a quantization_config (quant_method {method!r}); {NOT_SERVED}")


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Module name -> its layer type, for each module that holds quantized weights."""
    found = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        from_quant_package = QUANT_PACKAGES.fullmatch(type(module).__module__) and "Linear" in kind
        if QUANTIZED_LAYER.fullmatch(kind) or from_quant_package or hasattr(module, "qweight"):
            found[name] = kind
        elif isinstance(weight, torch.Tensor) and weight.dtype not in FLOAT_WEIGHTS:
            found[name] = f"{kind}, weight {weight.dtype}"
    return found


def check_layers(model: nn.Module, arch: str) -> None:
    """Names the first module of each quantized layer type."""
    first: dict[str, str] = {}
    for name, kind in quantized_layers(model).items():
        first.setdefault(kind, name)
    if first:
        layers = ", ".join(f"{name} ({kind})" for kind, name in first.items())
        verb = "is a quantized layer" if len(first) == 1 else "are quantized layers"
        raise UnsupportedModel(f"{arch}: {layers} {verb}; {NOT_SERVED}")
