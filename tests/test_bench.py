"""The GPU benchmark script, run on this CPU in --smoke mode so that it does not rot between GPU sessions."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_benchmark_smoke(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (table,) = tmp_path.glob("kernels-*.csv")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 3 and all(float(r["rel_error"]) < 2e-2 for r in rows)
    assert "| T | r | adapters |" in table.with_suffix(".md").read_text()
