"""Soak: N clients send mixed-adapter requests through every front door of the real tritonserver for
M minutes (lora_llm and ensemble gRPC streams, ensemble HTTP generate, lora_text over HTTP and gRPC),
with some requests for a missing adapter and some clients that leave mid-stream. Greedy answers must
equal the answers the same requests got alone. Prints completed requests, errors by type and the
resident memory of every server process at intervals.

    make soak                                          # 64 clients for 10 minutes
    python benchmarks/soak.py --clients 8 --minutes 1

Exits 1 on an unexpected error or wrong answer, a resident-memory drift above --max-drift between the
first sample after warm-up and the last, anything left in flight, or an unclean stop. Writes
<out>/soak-<machine>-<date>.md (default out: benchmarks/results).
"""

import argparse
import contextlib
import datetime
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL  # noqa: E402
from benchmarks.bench_serving import commit, machine  # noqa: E402
from benchmarks.report import slug  # noqa: E402
from client.api import InferenceServerException, infer, stream  # noqa: E402
from client.server import TritonServer  # noqa: E402
from demo.builders import DEMO_ADAPTERS, build_random_demo  # noqa: E402

ADAPTERS = [None, *DEMO_ADAPTERS]
MISSING = "soak-missing-adapter"  # its requests must get NOT_FOUND
TEXTS = ["Beautiful is better than", "Errors should never pass silently.", "Now is better than never"]
IDS = [[1, 17, 29, 41], [1, 300, 200, 100, 50], [1, 5, 6]]
LEAVE_SHARE = 0.05  # of stream requests whose client leaves after 1-4 responses
GREEDY_TOKENS = [8, 32]  # greedy requests ask for one of these and are checked against their answer alone


def lora_llm_stream(server, prompt, leave_after, **values):
    ids = []
    for i, chunk in enumerate(stream(server.grpc_url, "lora_llm", input_ids=IDS[prompt], stream=True, **values)):
        ids += chunk.token_ids
        if i + 1 == leave_after:
            break  # stream() cancels the request it leaves unfinished
    return ids


def ensemble_stream(server, prompt, leave_after, **values):
    text = ""
    for i, chunk in enumerate(stream(server.grpc_url, "ensemble", text_input=TEXTS[prompt], stream=True, **values)):
        text += chunk.text
        if i + 1 == leave_after:
            break
    return text


def ensemble_http_generate(server, prompt, leave_after, **values):
    body = json.dumps({"text_input": TEXTS[prompt], **{k: v for k, v in values.items() if v is not None}}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/ensemble/generate", body)
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return json.loads(r.read())["text_output"]
    except urllib.error.HTTPError as e:
        raise InferenceServerException(json.loads(e.read()).get("error", str(e)), status=str(e.code)) from None


def lora_text(protocol):
    def call(server, prompt, leave_after, **values):
        url = server.http_url if protocol == "http" else server.grpc_url
        return infer(url, protocol, "lora_text", text_input=TEXTS[prompt], **values).text

    return call


DOORS = {  # name: (call, family of its answers, whether a client can leave it mid-stream)
    "lora_llm gRPC stream": (lora_llm_stream, "ids", True),
    "ensemble gRPC stream": (ensemble_stream, "text", True),
    "ensemble HTTP generate": (ensemble_http_generate, "text", False),
    "lora_text HTTP": (lora_text("http"), "text", False),
    "lora_text gRPC": (lora_text("grpc"), "text", False),
}


class Soak:
    def __init__(self, server: TritonServer, seconds: float):
        self.server, self.deadline = server, time.monotonic() + seconds
        self.lock = threading.Lock()
        self.completed: Counter = Counter()  # door -> requests answered as expected
        self.errors: Counter = Counter()  # (expected?, kind) -> count
        self.references: dict = {}

    def reference(self, family: str, adapter, prompt: int, max_tokens: int):
        key = (family, adapter, prompt, max_tokens)
        if key not in self.references:  # asked alone, before the load starts
            values = dict(lora_name=adapter, max_tokens=max_tokens)
            door = "lora_llm gRPC stream" if family == "ids" else "lora_text HTTP"
            self.references[key] = DOORS[door][0](self.server, prompt, None, **values)
        return self.references[key]

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < self.deadline:
            door = rng.choice(list(DOORS))
            call, family, can_leave = DOORS[door]
            adapter = MISSING if rng.random() < 0.05 else rng.choice(ADAPTERS)
            prompt = rng.randrange(len(TEXTS))
            leave_after = rng.randint(1, 4) if can_leave and rng.random() < LEAVE_SHARE else None
            if rng.random() < 0.7:
                values, check = dict(max_tokens=rng.choice(GREEDY_TOKENS)), leave_after is None
            else:
                values = dict(max_tokens=rng.randint(1, 128), temperature=0.8, top_p=0.9, seed=rng.randrange(1 << 30))
                check = False
            try:
                answer = call(self.server, prompt, leave_after, lora_name=adapter, **values)
            except InferenceServerException as e:
                expected = adapter == MISSING and "not found" in e.message()
                self.count(door, expected, e.message()[:100] if expected else f"{door}: {e.message()[:100]}")
                continue
            except Exception as e:
                self.count(door, False, f"{door}: {type(e).__name__}: {str(e)[:100]}")
                continue
            if adapter == MISSING:
                self.count(door, False, f"{door}: served a missing adapter")
            elif check and answer != self.reference(family, adapter, prompt, values["max_tokens"]):
                self.count(door, False, f"wrong answer ({door}, {adapter or 'base'}, prompt {prompt})")
            else:
                self.count(door, True, "left mid-stream" if leave_after else None)

    def count(self, door: str, expected: bool, error: str | None) -> None:
        with self.lock:
            if expected:
                self.completed[door] += 1
            if error is not None:
                self.errors[(expected, error)] += 1

    @property
    def unexpected(self) -> int:
        return sum(n for (expected, _), n in self.errors.items() if not expected)


def resident_mb(server: TritonServer) -> dict[str, float]:
    sizes = {}
    for name, process in server.processes().items():
        with contextlib.suppress(psutil.NoSuchProcess):
            sizes[name] = process.memory_info().rss / 2**20
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64, help="requests in flight (each client sends one at a time)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--interval", type=float, help="seconds between memory samples (default: minutes x 6)")
    p.add_argument("--warmup", type=float, help="seconds before the baseline memory sample (default: 20%%)")
    p.add_argument("--max-drift", type=float, default=0.05, help="largest allowed RSS growth after warm-up")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    seconds = a.minutes * 60
    interval = a.interval or max(5.0, seconds / 10)
    warmup = a.warmup if a.warmup is not None else seconds * 0.2
    lines = [
        f"# Soak: {a.clients} clients for {a.minutes:g} minutes",
        "",
        f"- machine: {machine('cpu')}; date: {datetime.date.today()}; commit: {commit()}",
        f"- doors: {', '.join(DOORS)}; adapters: base, {', '.join(DEMO_ADAPTERS)}, and a missing one (5%)",
        "- 70% greedy (checked against the same request alone), 30% sampled; 5% of streams left mid-way",
        "",
    ]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    assets = build_random_demo()  # the tiny random model: thousands of requests a minute on 2 cores
    server = TritonServer(env={ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters")}).start()
    try:
        soak = Soak(server, seconds)
        for adapter in ADAPTERS:  # the answers alone, before any load
            for prompt in range(len(TEXTS)):
                for n in GREEDY_TOKENS:
                    soak.reference("ids", adapter, prompt, n)
                    soak.reference("text", adapter, prompt, n)
        soak.deadline = time.monotonic() + seconds
        clients = [threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(a.clients)]
        start = time.monotonic()
        for t in clients:
            t.start()
        samples = []
        say("| s | completed | unexpected errors | resident MB |")
        say("|---|---|---|---|")
        while True:
            time.sleep(min(interval, max(0.0, soak.deadline - time.monotonic())))
            elapsed = time.monotonic() - start
            samples.append((elapsed, resident_mb(server)))
            rss = ", ".join(f"{k} {v:.0f}" for k, v in sorted(samples[-1][1].items()))
            say(f"| {elapsed:.0f} | {sum(soak.completed.values())} | {soak.unexpected} | {rss} |")
            if time.monotonic() >= soak.deadline:
                break
        for t in clients:
            t.join(600)
        time.sleep(1.0)  # the last finals reach the metrics
        in_flight = server.metric("lora_engine_running_sequences") + server.metric("nv_inference_pending_request_count")
    finally:
        stop_start = time.monotonic()
        code = server.stop()
    stop_s = time.monotonic() - stop_start

    baseline = next(rss for t, rss in samples if t >= warmup) if samples[-1][0] >= warmup else samples[0][1]
    drift = {k: samples[-1][1].get(k, 0) / v - 1 for k, v in baseline.items() if v > 0}
    say("")
    say(f"completed: {sum(soak.completed.values())} ({', '.join(f'{k} {v}' for k, v in soak.completed.items())})")
    say("errors:" + ("" if soak.errors else " none"))
    for (expected, kind), n in soak.errors.most_common():
        say(f"- {n} x {kind} ({'expected' if expected else 'UNEXPECTED'})")
    say("resident memory drift after warm-up: " + ", ".join(f"{k} {v:+.1%}" for k, v in sorted(drift.items())))
    say(f"left in flight: {in_flight:.0f}; tritonserver exit code {code} after {stop_s:.1f} s")
    failed = soak.unexpected or max(drift.values()) > a.max_drift or in_flight or code != 0
    say("result: " + ("FAILED" if failed else "passed"))
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"soak-{slug(machine('cpu'))}-{datetime.date.today()}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
