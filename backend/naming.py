"""Adapter names and folders, with no torch: the OpenAI server lists adapters with it too."""

import math
import re
from pathlib import Path

from backend.errors import invalid

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_MIX_PARTS = 8
Mix = tuple[tuple[str, float], ...]


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise invalid(f"invalid LoRA adapter name {name!r}: must match {NAME_RE.pattern}")


def parse_mix(name: str) -> Mix | None:
    """A weighted combination of adapters, `a:0.7,b:-0.3` (a weight left out is 1) -> its parts; None for
    one adapter's name (which can hold neither ':' nor ',')."""
    if ":" not in name and "," not in name:
        return None
    parts = []
    for item in name.split(","):
        adapter, _, text = item.strip().partition(":")
        check_name(adapter)
        try:
            weight = float(text) if text.strip() else 1.0
        except ValueError:
            raise invalid(f"LoRA mix {name!r}: the weight {text!r} of '{adapter}' is not a number") from None
        if not math.isfinite(weight):
            raise invalid(f"LoRA mix {name!r}: the weight of '{adapter}' is not finite")
        parts.append((adapter, weight))
    if len(parts) > MAX_MIX_PARTS:
        raise invalid(f"LoRA mix {name!r} has {len(parts)} parts; at most {MAX_MIX_PARTS}")
    if len({a for a, _ in parts}) < len(parts):
        raise invalid(f"LoRA mix {name!r} names an adapter twice")
    return tuple(parts)


def lora_key(name: str) -> str:
    """The name a request's adapter is served, cached and counted under: an adapter's own name, or a
    mix's canonical form (`a:0.7,b:-0.3`); INVALID_ARG for anything else."""
    parts = parse_mix(name)
    if parts is None:
        check_name(name)
        return name
    return ",".join(f"{a}:{w!r}" for a, w in parts)


def adapter_folders(adapter_dir: Path) -> list[Path]:
    """The folders of adapter_dir that can be served by their name, sorted by name."""
    try:
        entries = sorted(Path(adapter_dir).iterdir())
    except OSError:
        return []
    return [e for e in entries if NAME_RE.fullmatch(e.name) and (e / CONFIG_FILE).is_file()]
