"""Adapter names and folders, with no torch: the OpenAI server lists adapters with it too."""

import re
from pathlib import Path

from backend.errors import invalid

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise invalid(f"invalid LoRA adapter name {name!r}: must match {NAME_RE.pattern}")


def adapter_folders(adapter_dir: Path) -> list[Path]:
    """The folders of adapter_dir that can be served by their name, sorted by name."""
    try:
        entries = sorted(Path(adapter_dir).iterdir())
    except OSError:
        return []
    return [e for e in entries if NAME_RE.fullmatch(e.name) and (e / CONFIG_FILE).is_file()]
