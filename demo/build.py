"""Builds .demo/ once: the real base model converted from GGUF (.demo/base) and the committed adapters
copied beside it (.demo/adapters); `--random` builds the tiny random model and adapters instead
(.demo/random), for when speed matters more than words.

    python -m demo.build [--random]
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from backend.config import DEMO_DIR
from demo.smollm2 import GGUF_FILE, convert
from demo.train_adapters import ADAPTERS_DIR


def adapters_digest(folder: Path = ADAPTERS_DIR) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build_demo(out_dir: Path = DEMO_DIR) -> Path:
    """out_dir/base (converted when its stamp is missing or stale) and out_dir/adapters/<name>."""
    out_dir = Path(out_dir)
    stamp = out_dir / "base" / "converted.json"
    recipe = {"gguf": GGUF_FILE, "version": 1}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == recipe):
        shutil.rmtree(out_dir / "base", ignore_errors=True)
        convert(out_dir / "base")
        stamp.write_text(json.dumps(recipe))
    copied, digest = out_dir / "adapters" / ".digest", adapters_digest()
    if not (copied.is_file() and copied.read_text() == digest):
        shutil.rmtree(out_dir / "adapters", ignore_errors=True)
        shutil.copytree(ADAPTERS_DIR, out_dir / "adapters")
        copied.write_text(digest)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", action="store_true", help="the tiny random model in .demo/random instead")
    a = p.parse_args(argv)
    if a.random:
        from demo.builders import build_random_demo

        print(build_random_demo())
    else:
        print(build_demo())


if __name__ == "__main__":
    main()
