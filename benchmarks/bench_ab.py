"""Before / after: the engine in-process from two checkouts, each in its own process, rounds interleaved
(the order flips every round), on the same model, adapters and requests. Prints tok/s medians, their ratio,
and the median of each round's ratio (paired: this machine's speed drifts by 10-20% between minutes).

    git worktree add /tmp/before <commit>
    python benchmarks/bench_ab.py --before /tmp/before --shape deep --rounds 5

The before checkout's benchmarks/subjects.py must read this checkout's Workload fields (seed and
system_len came on 2026-12-07): for an older commit, copy a benchmarks/workloads.py of that date with
them into it.
"""

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_serving import SHAPES  # noqa: E402
from benchmarks.workloads import build_assets, workloads  # noqa: E402


class Engine:
    """benchmarks.subjects' engine subject, run from a checkout."""

    def __init__(self, checkout: Path, assets: Path, shape):
        cmd = [sys.executable, "-m", "benchmarks.subjects", "engine", "--assets", str(assets)]
        self.proc = subprocess.Popen(
            cmd, cwd=checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._send(asdict(shape))
        self.proc.stdout.readline()

    def _send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def tok_s(self, w, seed: int) -> float:
        self._send(asdict(w) | {"seed": seed})
        reply = json.loads(self.proc.stdout.readline())
        return sum(len(q["output"]) for q in reply["requests"]) / reply["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="the other checkout (a git worktree)")
    p.add_argument("--shape", choices=list(SHAPES), default="anchor")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workloads", nargs="+", default=["base only", "32 distinct"])
    a = p.parse_args(argv)
    shape = SHAPES[a.shape]
    assets = build_assets(ROOT / ".bench" / a.shape, shape)
    loads = [w for w in workloads(real=bool(shape.base)) if w.name in a.workloads]
    subjects = {"before": Engine(a.before, assets, shape), "after": Engine(ROOT, assets, shape)}
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        for rnd in range(a.rounds + 1):  # round 0 warms up
            for w in loads:
                for name in ["before", "after"][:: 1 if rnd % 2 else -1]:
                    rate = subjects[name].tok_s(w, rnd)
                    if rnd:
                        rates.setdefault((name, w.name), []).append(rate)
    finally:
        for s in subjects.values():
            s.close()
    # paired: the median of each round's after / before, whose two runs share the machine's state of the moment
    print("| shape | workload | before tok/s | after tok/s | after / before | paired | rounds (before / after) |")
    print("|---|---|---|---|---|---|---|")
    for w in loads:
        b, after = (rates[name, w.name] for name in ("before", "after"))
        mb, ma = statistics.median(b), statistics.median(after)
        paired = statistics.median(y / x for x, y in zip(b, after))
        rounds = f"{[round(x) for x in b]} / {[round(x) for x in after]}"
        print(f"| {a.shape} | {w.name} | {mb:.0f} | {ma:.0f} | {ma / mb:.2f}x | {paired:.2f}x | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
