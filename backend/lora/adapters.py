"""Reading PEFT LoRA adapter folders with PEFT's own semantics, validated against the base model."""

import hashlib
import json
import math
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from backend.errors import RequestError, invalid, not_found
from backend.naming import CONFIG_FILE, WEIGHTS_FILE, Mix, check_name, parse_mix

KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|lora_magnitude_vector(?:\.weight)?)$"
)

# PEFT options whose effect we do not (yet) apply: serving them would silently change the output.
UNSUPPORTED = {
    "modules_to_save": "modules_to_save",
    "lora_bias": "lora_bias",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "target_parameters": "target_parameters",
    "use_qalora": "QALoRA (use_qalora)",
}


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def parse_safetensors(data: bytearray) -> dict[str, torch.Tensor]:
    """A safetensors file read into memory -> its tensors, as views of `data` (no second copy)."""
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError("the header is longer than the file")
    header = json.loads(data[8 : 8 + size])
    start = 8 + size
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key!r} has dtype {info['dtype']}, not a float type")
        begin, end = info["data_offsets"]
        count = math.prod(info["shape"])
        if not 0 <= begin <= end <= len(data) - start or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {key!r}: offsets {begin}..{end} do not fit its shape or the file")
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin) if count else torch.empty(0)
        tensors[key] = flat.reshape(info["shape"])
    return tensors


@dataclass(frozen=True)
class ModuleLoRA:
    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA's m [d_out], as trained
    g: torch.Tensor | None = None  # DoRA's m / ‖W + s·B·A‖ per output row [d_out] fp32, for the served W

    @property
    def rank(self) -> int:
        return self.a.shape[0]


# (module, s·A [r, d_in], B [d_out, r]) -> ‖W + B·(s·A)‖ per output row [d_out], fp32, for the served weights W
RowNorms = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def dora_scales(name: str, modules: dict[str, ModuleLoRA], norms: RowNorms) -> dict[str, ModuleLoRA]:
    """Fills in g = m / ‖W + s·B·A‖ (PEFT's DoRA, computed once here in fp32) for modules with a magnitude."""
    out = {}
    for module, m in modules.items():
        if m.magnitude is not None:
            g = m.magnitude.float() / norms(module, m.a.float() * m.scale, m.b.float())
            if not torch.isfinite(g).all():
                raise invalid(f"LoRA adapter '{name}': DoRA scale at '{module}' is not finite (a zero row norm)")
            m = replace(m, g=g)
        out[module] = m
    return out


FileStamp = tuple[int, int, int]  # (inode, size, mtime ns): changes when a file is replaced or rewritten
Stamp = tuple[FileStamp, FileStamp | None]  # adapter_config.json, adapter_model.safetensors (None: missing)
MixStamp = tuple[Stamp, ...]  # a mix: its parts' stamps


def file_stamp(st: os.stat_result) -> FileStamp:
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True, eq=False)
class Adapter:
    """One version of an adapter as read from its folder. Its tensors keep the file's dtype and view
    the bytes read (`nbytes`, what the host tier holds); a slot converts them when it is filled."""

    name: str
    modules: dict[str, ModuleLoRA]
    version: str = ""  # content hash of adapter_config.json + adapter_model.safetensors
    stamp: Stamp | None = None  # the files as they were read
    read_at: float = 0.0  # time.monotonic() when the read began
    nbytes: int = 0

    @property
    def dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())


def stamp_bytes(stamp: Stamp | MixStamp) -> int:
    """Bytes the host tier holds for an adapter whose files have this stamp (a mix: its parts in float32,
    at most twice their 16-bit files)."""
    if isinstance(stamp[0][0], tuple):
        return sum(2 * stamp_bytes(part) for part in stamp)
    return stamp[0][1] + (stamp[1][1] if stamp[1] else 0)


def combine(name: str, parts: list[tuple[Adapter, float]], max_rank: int) -> Adapter:
    """PEFT's add_weighted_adapter(combination_type="cat"): per layer A = [w_1·s_1·A_1; w_2·s_2·A_2; ...]
    and B = [B_1 | B_2 | ...] in float32, scale 1, so that B·A = Σ w_i·s_i·B_i·A_i exactly, at rank Σ r_i.
    A layer that a part has no weights for gets nothing from it. A DoRA part keeps its magnitudes: its
    direction is then normalized with every part's delta in it (what hybrid serving needs, see _load_mix)."""
    modules = {}
    for module in sorted(set().union(*(a.modules for a, _ in parts))):
        present = [(a.modules[module], w) for a, w in parts if module in a.modules]
        rank = sum(m.rank for m, _ in present)
        if rank > max_rank:
            raise invalid(
                f"LoRA mix '{name}': rank {rank} at '{module}' (the sum of its parts' ranks "
                f"{'+'.join(str(m.rank) for m, _ in present)}) is above the configured max_lora_rank {max_rank}"
            )
        a = torch.cat([m.a.float() * w * m.scale for m, w in present])
        b = torch.cat([m.b.float() for m, _ in present], dim=1)
        magnitude = next((m.magnitude for m, _ in present if m.magnitude is not None), None)
        modules[module] = ModuleLoRA(a, b, 1.0, magnitude)
    version = hashlib.sha256(repr([(a.name, a.version, w) for a, w in parts]).encode()).hexdigest()[:16]
    nbytes = sum(m.a.nbytes + m.b.nbytes for m in modules.values())
    stamp = tuple(a.stamp for a, _ in parts)
    return Adapter(name, modules, version, stamp, min(a.read_at for a, _ in parts), nbytes)


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
    model's LoRA-capable layers (`shapes`: module name -> (d_in, d_out)); `norms` gives DoRA adapters
    their scales against the served weights."""

    def __init__(
        self,
        root: Path,
        shapes: dict[str, tuple[int, int]],
        base_modules: list[str],
        max_rank: int,
        allow_symlinks: bool = False,
        norms: RowNorms | None = None,
    ):
        self.root = Path(root)
        self.shapes = shapes
        self.norms = norms
        self.base_modules = base_modules
        self.max_rank = max_rank
        self.allow_symlinks = allow_symlinks
        self.frozen: dict[str, Adapter] = {}  # served as read once, whatever their folders hold now
        # the largest file a valid adapter can be: every layer at the highest rank in fp32, and its header
        self.max_file_bytes = sum(d_in + d_out for d_in, d_out in shapes.values()) * max_rank * 4 + 2**20

    def folder(self, name: str) -> Path:
        check_name(name)
        folder = self.root / name
        if not (folder / CONFIG_FILE).is_file():
            raise not_found(name)
        return folder

    def stamp(self, name: str) -> Stamp | MixStamp:
        """The adapter's files as they are now (a few stat calls); NOT_FOUND without its folder."""
        parts = parse_mix(name)
        if parts is not None:
            return tuple(self.stamp(adapter) for adapter, _ in parts)
        if name in self.frozen:
            return self.frozen[name].stamp
        folder = self.folder(name)
        try:
            config = file_stamp((folder / CONFIG_FILE).stat())
        except FileNotFoundError:
            raise not_found(name) from None
        try:
            weights = file_stamp((folder / WEIGHTS_FILE).stat())
        except FileNotFoundError:
            weights = None
        return config, weights

    def load(self, name: str) -> Adapter:
        parts = parse_mix(name)
        if parts is not None:
            return self._with_scales(self._load_mix(name, parts))
        return self._with_scales(self._load_one(name))

    def _with_scales(self, adapter: Adapter) -> Adapter:
        if not adapter.dora or all(m.g is not None for m in adapter.modules.values() if m.magnitude is not None):
            return adapter
        if self.norms is None:
            raise invalid(f"LoRA adapter '{adapter.name}': DoRA (use_dora) is not supported here")
        return replace(adapter, modules=dora_scales(adapter.name, adapter.modules, self.norms))

    def _load_one(self, name: str) -> Adapter:
        if name in self.frozen:
            return self.frozen[name]
        read_at = time.monotonic()
        folder = self.folder(name)
        if not (folder / WEIGHTS_FILE).is_file():
            pickled = " (a pickle .bin is refused: loading it can run code)" if any(folder.glob("*.bin")) else ""
            raise invalid(f"LoRA adapter '{name}': no {WEIGHTS_FILE}{pickled}")
        try:
            config, config_stamp = self._read(name, folder / CONFIG_FILE, 2**20)
            weights, weights_stamp = self._read(name, folder / WEIGHTS_FILE, self.max_file_bytes)
            if file_stamp((folder / CONFIG_FILE).stat()) != config_stamp:  # never a config and weights of two versions
                raise invalid(f"LoRA adapter '{name}': {CONFIG_FILE} changed while it was read; try again")
            digest = hashlib.sha256(config)
            digest.update(b"\0")
            digest.update(weights)  # releases the GIL: the engine thread steps meanwhile
            version = digest.hexdigest()[:16]
            cfg = json.loads(config)
            tensors = parse_safetensors(weights)
            if not isinstance(cfg, dict):
                raise ValueError(f"{CONFIG_FILE} is not a JSON object")
            modules = self._modules(name, cfg, tensors)
        except FileNotFoundError:  # deleted while it was read
            raise not_found(name) from None
        except RequestError:
            raise
        except Exception as e:  # any malformed file: this adapter's requests fail, nothing else
            raise invalid(f"LoRA adapter '{name}': cannot read: {e}") from e
        stamp = (config_stamp, weights_stamp)
        return Adapter(name, modules, version, stamp, read_at, len(config) + len(weights))

    def _load_mix(self, name: str, parts: Mix) -> Adapter:
        """A DoRA adapter's magnitude does not combine linearly (PEFT's cat has no exact form for it), so a
        mix may hold one only as hybrid serving builds it: with weight 1, beside merged adapters at -1."""
        read_at = time.monotonic()
        loaded = [(self._load_one(adapter), weight) for adapter, weight in parts]
        dora = [a for a, _ in loaded if a.dora]
        shift = all(a in dora and w == 1.0 or a.name in self.frozen and w == -1.0 for a, w in loaded)
        if dora and (len(dora) > 1 or not shift):
            raise invalid(f"LoRA mix '{name}': '{dora[0].name}' is a DoRA adapter, which cannot be mixed")
        return replace(combine(name, loaded, self.max_rank), read_at=read_at)

    def _read(self, name: str, path: Path, max_bytes: int) -> tuple[bytearray, FileStamp]:
        """The file's bytes, read whole: what is served never maps a file that can change under it.
        Refused: a symlink that leads out of the adapter's folder, a file above `max_bytes`, a file
        that changed while it was read."""
        if not self.allow_symlinks and not path.resolve().is_relative_to(self.root.resolve() / name):
            raise invalid(f"LoRA adapter '{name}': {path.name} is a link out of the adapter's folder (refused)")
        before = path.stat()
        if before.st_size > max_bytes:
            raise invalid(f"LoRA adapter '{name}': {path.name} is {before.st_size} bytes, above {max_bytes}")
        data = bytearray(before.st_size)
        with open(path, "rb") as f:
            got = f.readinto(data)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or got != after.st_size:
            raise invalid(f"LoRA adapter '{name}': {path.name} changed while it was read; try again")
        return data, file_stamp(before)

    def _modules(self, name: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> dict[str, ModuleLoRA]:
        def fail(msg: str) -> RequestError:
            return invalid(f"LoRA adapter '{name}': {msg}")

        if cfg.get("peft_type", "LORA") != "LORA":
            raise fail(f"peft_type {cfg.get('peft_type')} is not supported (LORA only)")
        for key, label in UNSUPPORTED.items():
            if cfg.get(key):
                raise fail(f"{label} is not supported")
        dora = bool(cfg.get("use_dora"))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            m = KEY_RE.match(key)
            if not m:
                hint = " (saved base weights: save with save_embedding_layers=False)" if "base_layer" in key else ""
                raise fail(f"unsupported tensor {key!r}: only lora_A / lora_B weights of linear layers{hint}")
            if not m["part"] and not dora:
                raise fail(f"tensor {key!r} is a DoRA magnitude, and adapter_config.json does not set use_dora")
            pairs.setdefault(m["module"], {})[m["part"] or "magnitude"] = tensor

        targets = select_targets(cfg.get("target_modules"), self.base_modules, set(self.shapes))
        if cfg.get("target_modules") is not None and not targets:
            raise fail(f"target_modules {cfg['target_modules']!r} matches no layer of the base model")
        modules = {}
        for module, ab in sorted(pairs.items()):
            if module not in self.shapes:
                where = "is not a LoRA-capable layer of" if module in self.base_modules else "is missing in"
                raise fail(f"target module '{module}' {where} the base model")
            if set(ab) != {"lora_A", "lora_B", *(["magnitude"] if dora else [])}:
                parts = "lora_A, lora_B or its DoRA magnitude" if dora else "lora_A or lora_B"
                raise fail(f"module '{module}' lacks {parts}")
            a, b, magnitude = ab["lora_A"], ab["lora_B"], ab.get("magnitude")
            d_in, d_out = self.shapes[module]
            rank = a.shape[0]
            if a.shape != (rank, d_in) or b.shape != (d_out, rank):
                raise fail(
                    f"shape mismatch at '{module}': lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, "
                    f"base layer in={d_in} out={d_out}"
                )
            if magnitude is not None and magnitude.shape != (d_out,):
                raise fail(f"DoRA magnitude at '{module}' has shape {tuple(magnitude.shape)}, the layer out={d_out}")
            if rank > self.max_rank:
                raise fail(f"rank {rank} at '{module}' is above the configured max_lora_rank {self.max_rank}")
            declared = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
            if declared != rank:
                raise fail(f"adapter_config.json gives '{module}' rank {declared}, its tensors have rank {rank}")
            if targets and module not in targets:
                raise fail(f"weights for '{module}', which target_modules does not select")
            modules[module] = ModuleLoRA(a, b, module_scale(cfg, module, rank), magnitude)
        if not modules:
            raise fail("no LoRA weights")
        return modules
