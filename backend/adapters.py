"""Reading PEFT LoRA adapter folders with PEFT's own semantics, validated against the base model."""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from backend.errors import RequestError, invalid, not_found

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")

# PEFT options whose effect we do not (yet) apply: serving them would silently change the output.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save",
    "lora_bias": "lora_bias",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "target_parameters": "target_parameters",
    "use_qalora": "QALoRA (use_qalora)",
}


@dataclass(frozen=True)
class ModuleLoRA:
    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class Adapter:
    name: str
    modules: dict[str, ModuleLoRA]

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise invalid(f"invalid LoRA adapter name {name!r}: must match {NAME_RE.pattern}")


def pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern that matches a dotted suffix of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(cfg: dict, module: str, rank: int) -> float:
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def select_targets(target_modules, names: list[str], linear: set[str]) -> set[str]:
    """The base modules PEFT's `target_modules` selects: a regex (full match), a list of names or
    dotted suffixes, or "all-linear" (every linear layer except the output layer)."""
    if target_modules == "all-linear":
        return {n for n in names if n in linear}
    if isinstance(target_modules, str):
        return {n for n in names if re.fullmatch(target_modules, n)}
    targets = set(target_modules or [])
    return {n for n in names if n in targets or any(n.endswith("." + t) for t in targets)}


class AdapterStore:
    """Finds adapters under `root` (one folder per name) and reads them, validated against the base
    model's LoRA-capable layers (`shapes`: module name -> (d_in, d_out))."""

    def __init__(
        self, root: Path, shapes: dict[str, tuple[int, int]], base_modules: list[str], max_rank: int, dtype: torch.dtype
    ):
        self.root = Path(root)
        self.shapes = shapes
        self.base_modules = base_modules
        self.max_rank = max_rank
        self.dtype = dtype

    def folder(self, name: str) -> Path:
        check_name(name)
        folder = self.root / name
        if not (folder / CONFIG_FILE).is_file():
            raise not_found(name)
        return folder

    def load(self, name: str) -> Adapter:
        folder = self.folder(name)
        if not (folder / WEIGHTS_FILE).is_file():
            pickled = " (a pickle .bin is refused: loading it can run code)" if any(folder.glob("*.bin")) else ""
            raise invalid(f"LoRA adapter '{name}': no {WEIGHTS_FILE}{pickled}")
        try:
            cfg = json.loads((folder / CONFIG_FILE).read_text())
            tensors = load_file(folder / WEIGHTS_FILE)
            if not isinstance(cfg, dict):
                raise ValueError(f"{CONFIG_FILE} is not a JSON object")
            return Adapter(name, self._modules(name, cfg, tensors))
        except RequestError:
            raise
        except Exception as e:  # any malformed file: this adapter's requests fail, nothing else
            raise invalid(f"LoRA adapter '{name}': cannot read: {e}") from e

    def _modules(self, name: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> dict[str, ModuleLoRA]:
        def fail(msg: str) -> RequestError:
            return invalid(f"LoRA adapter '{name}': {msg}")

        if cfg.get("peft_type", "LORA") != "LORA":
            raise fail(f"peft_type {cfg.get('peft_type')} is not supported (LORA only)")
        for key, label in UNSUPPORTED.items():
            if cfg.get(key):
                raise fail(f"{label} is not supported")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            m = KEY_RE.match(key)
            if not m:
                hint = " (saved base weights: save with save_embedding_layers=False)" if "base_layer" in key else ""
                raise fail(f"unsupported tensor {key!r}: only lora_A / lora_B weights of linear layers{hint}")
            pairs.setdefault(m["module"], {})[m["part"]] = tensor

        targets = select_targets(cfg.get("target_modules"), self.base_modules, set(self.shapes))
        modules = {}
        for module, ab in sorted(pairs.items()):
            if module not in self.shapes:
                where = "is not a LoRA-capable layer of" if module in self.base_modules else "is missing in"
                raise fail(f"target module '{module}' {where} the base model")
            if set(ab) != {"lora_A", "lora_B"}:
                raise fail(f"module '{module}' lacks lora_A or lora_B")
            a, b = ab["lora_A"], ab["lora_B"]
            d_in, d_out = self.shapes[module]
            rank = a.shape[0]
            if a.shape != (rank, d_in) or b.shape != (d_out, rank):
                raise fail(
                    f"shape mismatch at '{module}': lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, "
                    f"base layer in={d_in} out={d_out}"
                )
            if rank > self.max_rank:
                raise fail(f"rank {rank} at '{module}' is above the configured max_lora_rank {self.max_rank}")
            if targets and module not in targets:
                raise fail(f"weights for '{module}', which target_modules does not select")
            modules[module] = ModuleLoRA(
                a.to(self.dtype).contiguous(), b.to(self.dtype).contiguous(), module_scale(cfg, module, rank)
            )
        if not modules:
            raise fail("no LoRA weights")
        return modules
