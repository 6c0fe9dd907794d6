"""The GPU benchmark script, run on this CPU in --smoke mode so that it does not rot between GPU sessions."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.heavy
def test_serving_benchmark_quick(tmp_path):
    """`make bench` in --quick mode: a tiny model, every system (PEFT, the engine, the real tritonserver,
    the OpenAI server in front of it) and workload once. It checks that the benchmark works and that
    every greedy output equals PEFT's; it says nothing about speed."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--quick", "--out", str(tmp_path),
         "--assets", str(tmp_path / "assets")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (table,) = tmp_path.glob("serving-quick-*.csv")
    rows = list(csv.DictReader(table.open()))
    assert {r["system"] for r in rows} == {"peft", "engine", "server", "openai"} and len(rows) == 28
    for r in rows:
        same, total = map(int, r["exact"].split("/"))
        assert same == total > 0 and r["errors"] == "0" and float(r["tok_s"]) > 0, r
    text = table.with_suffix(".md").read_text()
    assert "| target | measured | goal |" in text and "machine:" in text and "commit:" in text
    assert "one hot 80%, by request group:" in text and "| prefix 2x64 |" in text
    assert table.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.heavy
def test_soak_smoke(tmp_path):
    """`make soak` for a few seconds with a few clients: every front door answers, nothing unexpected
    fails, nothing stays in flight and the server stops cleanly. Memory drift is not judged so soon."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--clients", "4", "--minutes", "0.25",
         "--max-drift", "10", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("soak-*.md")
    text = report.read_text()
    assert "result: passed" in text and "left in flight: 0; tritonserver exit code 0" in text
