"""The Docker image installs the triton that requirements.txt pins (the one the kernels are tested with),
not the one the CUDA torch wheel pins. Docker cannot run here: the Dockerfile's pip RUN runs in bash with a
stand-in python3 that logs each pip install (and the requirements files it reads) and reports, for
`import triton`, the version installed last (torch's 3.7.1 if none was)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_TRITON = "3.7.1"  # what torch==2.13.0 from PyPI pins
FAKE_PYTHON = r"""#!/bin/bash
if [ "$1 $2" = "-m pip" ]; then
  echo "$*" >>"$PIP_LOG"
  for a in "$@"; do [ "$prev" = "-r" ] && cat "$a" >>"$PIP_LOG.r"; prev=$a; done
  exit 0
fi
if [ "$1" = "-c" ]; then
  pin=$(grep -oE 'triton==[^ ]+' "$PIP_LOG" | tail -1)
  echo "${FAKE_TRITON:-${pin#triton==}}"; exit 0
fi
exit 2
"""


def pinned(requirements: str, name: str) -> str:
    (version,) = re.findall(rf"^{re.escape(name)}==(\S+)\s*$", requirements, re.M)
    return version


def pip_run() -> str:
    """The Dockerfile's RUN that installs requirements.txt, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (run,) = [line for line in text.splitlines() if line.startswith("RUN ") and "/tmp/requirements.txt" in line]
    return run[len("RUN ") :]


def build(tmp_path: Path, requirements: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the RUN with /tmp/ as a folder of its own holding these requirements; (result, pip calls)."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "requirements.txt").write_text(requirements)
    shutil.copy(ROOT / "constraints.txt", files)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    log = tmp_path / "pip.log"
    log.touch()
    command = pip_run().replace("/tmp/", f"{files}/")
    variables = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PIP_LOG": str(log), **env}
    done = subprocess.run(["bash", "-c", command], env=variables, capture_output=True, text=True, timeout=60)
    return done, log.read_text().splitlines()


def test_the_image_installs_the_pinned_triton_after_torch(tmp_path):
    requirements = (ROOT / "requirements.txt").read_text()
    version = pinned(requirements, "triton")
    assert version != TORCH_TRITON
    done, calls = build(tmp_path, requirements)
    assert done.returncode == 0, done.stderr
    first, second = calls
    assert "-r " in first and f"triton=={version}" not in first  # torch, with its own triton
    assert pinned((tmp_path / "pip.log.r").read_text(), "torch") == pinned(requirements, "torch")
    assert "--no-deps" in second and second.endswith(f"triton=={version}")


def test_the_version_comes_from_requirements_txt(tmp_path):
    requirements = re.sub(r"^triton==\S+", "triton==9.8.7", (ROOT / "requirements.txt").read_text(), flags=re.M)
    done, calls = build(tmp_path, requirements)
    assert done.returncode == 0, done.stderr
    assert calls[-1].endswith("triton==9.8.7")


@pytest.mark.parametrize("found", [TORCH_TRITON, "3.9.1"])
def test_the_build_fails_if_another_triton_is_installed(tmp_path, found):
    requirements = (ROOT / "requirements.txt").read_text()
    done, _ = build(tmp_path, requirements, FAKE_TRITON=found)
    assert done.returncode != 0
    assert (
        f"requirements.txt pins triton=={pinned(requirements, 'triton')}, the image has triton=={found}" in done.stderr
    )
