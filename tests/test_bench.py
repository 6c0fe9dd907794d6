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


@pytest.mark.heavy
@pytest.mark.skipif(
    not (ROOT / ".venv-vllm" / "bin" / "python").exists(), reason="no .venv-vllm (make bench-vllm-setup)"
)
def test_vllm_subject(tmp_path):
    """vLLM's CPU backend as a bench subject (benchmarks/vllm_subject.py under .venv-vllm), on a tiny model
    whose head size (32) vLLM's CPU attention takes: base and adapter requests, 4 in flight of 8, 3 adapters
    for 2 slots (max_loras=2), each with new_tokens tokens, a time for each, and the greedy output PEFT's
    subject gives for the same request."""
    from benchmarks.bench_serving import Subject
    from benchmarks.workloads import Shape, Workload, build_assets

    shape = Shape(
        vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_adapters=4,
    )  # fmt: skip
    assets = build_assets(tmp_path / "assets", shape)
    loads = [Workload("base", 8, 4, "base", prompt_len=8, new_tokens=8), Workload("3", 8, 4, "distinct", 3)]
    replies = {}
    for system in ("peft", "vllm:max_loras=2"):
        subject = Subject(system, assets, shape, "cpu", "float32", tmp_path / f"{system.split(':')[0]}.log")
        try:
            replies[system.split(":")[0]] = [subject.run(w, seed=1)["requests"] for w in loads]
        finally:
            subject.close()
    for w, peft, vllm in zip(loads, replies["peft"], replies["vllm"]):
        assert [q["output"] for q in vllm] == [q["output"] for q in peft], w.name
        for q in vllm:
            assert len(q["output"]) == len(q["t_tokens"]) == w.new_tokens and q["t_tokens"][0] > q["t_submit"]
    assert {q["adapter"] for q in replies["vllm"][1]} == {"a000", "a001", "a002"}
