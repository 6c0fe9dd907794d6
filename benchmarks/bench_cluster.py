"""Replicas behind the router against one: the same workload through vllm-router (backend/cluster.py) to 1 replica
and to 2 replicas of the tiny random demo model (each engine on its share of the cores, the launcher's default;
--threads N gives every engine N), each configuration started fresh every round, rounds interleaved (the order
reversed each round). The workload: --requests greedy completions spread evenly over --adapters adapters (copies
of the demo's four under more names), --concurrency at a time, --max-tokens each (ignore_eos), each with its routing
header; one request per adapter first, untimed (adapter loads). Reports output tok/s per run and the medians.

    python benchmarks/bench_cluster.py [--rounds 3] [--requests 64] [--adapters 8] [--concurrency 8] [--threads N]

Writes <out>/cluster[-threadsN]-<machine>-<date>.md (default out: benchmarks/results)."""

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backend.cluster import THREADS, Cluster, start_cluster  # noqa: E402
from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL  # noqa: E402
from benchmarks.bench_serving import commit, machine  # noqa: E402
from benchmarks.report import slug  # noqa: E402
from client.api import routing_headers  # noqa: E402
from client.server import TritonServer  # noqa: E402
from demo.builders import DEMO_ADAPTERS, build_random_demo  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog, and then"


def adapter_folder(demo: Path, out: Path, count: int) -> list[str]:
    """count adapters in out: the demo's, in turn, under names of their own."""
    names = [f"{name}-{i}" for i in range(-(-count // len(DEMO_ADAPTERS))) for name in DEMO_ADAPTERS][:count]
    for name in names:
        shutil.copytree(demo / "adapters" / name.rsplit("-", 1)[0], out / name)
    return names


def run(client: openai.OpenAI, names: list[str], concurrency: int, max_tokens: int) -> int:
    """All requests, `concurrency` at a time; the tokens generated."""

    def one(name: str) -> int:
        kw = dict(model=name, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
        return client.completions.create(extra_headers=routing_headers(name), **kw).usage.completion_tokens

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(one, names))


def split(cluster: Cluster, names: list[str]) -> list[int]:
    """How many of the adapters each replica served."""
    counters = [TritonServer(metrics_port=r.ports["METRICS_PORT"]) for r in cluster.replicas]
    return [sum(1 for n in names if t.metric("lora_requests_total", adapter=n)) for t in counters]


def measure(replicas: int, env: dict, names: list[str], args) -> dict:
    cluster = start_cluster(replicas, env=env)
    try:
        client = openai.OpenAI(base_url=f"{cluster.router.url}/v1", api_key="unused", max_retries=0, timeout=300)
        run(client, names, args.concurrency, 2)
        workload = [names[i % len(names)] for i in range(args.requests)]
        start = time.perf_counter()
        tokens = run(client, workload, args.concurrency, args.max_tokens)
        seconds = time.perf_counter() - start
        label = f"{replicas} ({cluster.replicas[0].env[THREADS]} torch threads each)"
        return {"label": label, "tokens": tokens, "seconds": seconds, "split": split(cluster, names)}
    finally:
        if not cluster.stop():
            print(f"warning: {replicas} replica(s) did not stop cleanly", file=sys.stderr)


def report(results: list[dict], args, names: list[str]) -> str:
    cores = len(os.sched_getaffinity(0))
    labels = list(dict.fromkeys(r["label"] for r in results))
    median = {k: statistics.median(r["tokens"] / r["seconds"] for r in results if r["label"] == k) for k in labels}
    one = median[labels[0]]
    lines = [
        "# Replicas behind vllm-router: 2 against 1",
        "",
        f"- machine: {args.machine}; date: {args.date}; commit: {commit()}",
        f"- the tiny random demo model (.demo/random), {len(names)} adapters; {args.requests} greedy completions"
        f" spread evenly over them, {args.concurrency} at a time, {args.max_tokens} new tokens each (ignore_eos),"
        " through vllm-router (python -m backend.cluster's settings, routing header = adapter)",
        f"- {args.rounds} rounds, interleaved; each configuration started fresh in each round",
        "",
        "| round | replicas | s | output tok/s | adapters per replica |",
        "|---|---|---|---|---|",
        *(
            f"| {i // len(labels) + 1} | {r['label']} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} |"
            f" {' / '.join(map(str, r['split']))} |"
            for i, r in enumerate(results)
        ),
        "",
        "| replicas | median output tok/s | against 1 replica |",
        "|---|---|---|",
        *(f"| {k} | {v:.0f} | {v / one:.2f}x |" for k, v in median.items()),
        "",
        (
            f"Every engine was given {args.threads} torch threads (--threads): on {cores} cores, two replicas' threads"
            " contend for the same cores."
            if args.threads
            else "Both replicas share this machine's cores, so a second replica adds no capacity here: each engine"
            " gets its share of the cores (LORA_NUM_THREADS). The ratio says what the router and splitting the cores"
            " cost; on separate machines or GPUs each replica brings its own."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="LORA_NUM_THREADS of every replica (default: its share of the cores)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    args.machine, args.date = machine("cpu"), datetime.date.today().isoformat()
    demo = build_random_demo()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        names = adapter_folder(demo, Path(tmp), args.adapters)
        env = {**os.environ, ENV_BASE_MODEL: str(demo / "base"), ENV_ADAPTER_DIR: tmp}
        if args.threads:
            env[THREADS] = str(args.threads)
        for r in range(args.rounds):
            for replicas in (1, 2) if r % 2 == 0 else (2, 1):
                results.append(measure(replicas, env, names, args))
                print(results[-1], flush=True)
    text = report(results, args, names)
    path = args.out / f"cluster{f'-threads{args.threads}' if args.threads else ''}-{slug(args.machine)}-{args.date}.md"
    path.write_text(text)
    print(text, f"\nwritten: {path}", sep="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
