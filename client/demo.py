"""The demo: tritonserver on model_repository/ with the built-in base model and adapters, text
requests for several adapters and the base model at once over HTTP and gRPC (unary and streamed),
then a clean stop.

    python -m client.demo [--port-base 8000]
"""

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from backend.demo import DEMO_ADAPTERS, build_demo
from client.api import infer, stream
from client.server import TritonServer, free_port

PROMPT = "Beautiful is better than"


def ask(server: TritonServer, how: str, adapter: str | None, prompt: str) -> tuple[str, str, str, str]:
    values = dict(text_input=prompt, lora_name=adapter, max_tokens=16)
    if how == "grpc stream":
        text = "".join(c.text for c in stream(server.grpc_url, "ensemble", stream=True, **values))
    else:
        protocol = how.split()[0]
        text = infer(server.http_url if protocol == "http" else server.grpc_url, protocol, "lora_text", **values).text
    return how, adapter or "(base)", prompt, text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port-base", type=int, default=None, help="http, grpc, metrics on N, N+1, N+2 (default: free)")
    a = p.parse_args(argv)
    print("building demo assets (once) ...", flush=True)
    build_demo()
    ports = [a.port_base + i for i in range(3)] if a.port_base else [free_port() for _ in range(3)]
    server = TritonServer(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
    print(
        f"starting tritonserver --model-repository model_repository (http {ports[0]}, grpc {ports[1]}, "
        f"metrics {ports[2]}; log {server.log_path or 'in $TMPDIR'}) ...",
        flush=True,
    )
    start = time.monotonic()
    server.start()
    try:
        print(f"ready in {time.monotonic() - start:.1f} s\n")
        adapters = [None, *DEMO_ADAPTERS]
        # one prompt for all: answers differ by adapter only, and agree across protocols
        jobs = [(how, adapter, PROMPT) for adapter in adapters for how in ["http unary", "grpc unary", "grpc stream"]]
        with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share engine steps
            answers = list(pool.map(lambda job: ask(server, *job), jobs))
        for how, adapter, prompt, text in answers:
            print(f"[{how:11}] {adapter:16} {prompt!r} -> {text!r}")
        print("(a random base model and random adapters: the words are noise; which answers agree is the point)")
        steps = server.metric("lora_engine_steps_total")
        mixed = server.metric("lora_engine_mixed_steps_total")
        widest = server.metric("lora_engine_max_adapters_per_step")
        print(
            f"\nengine: {steps:.0f} steps, {mixed:.0f} of them mixing adapters, up to {widest:.0f} adapters "
            f"(base included) in one step (Prometheus: http://localhost:{ports[2]}/metrics)"
        )
    finally:
        code = server.stop()
    print(f"tritonserver stopped (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
