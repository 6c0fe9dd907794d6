"""N replicas of `make serve` behind vllm-router (`make cluster`). Each replica is backend.serve (tritonserver and
the OpenAI server) on free ports of its own, all on one model and one adapter folder, which stays the source of
truth; the router sends every request for one adapter to one replica (the header of client.api.routing_headers)
and a dead replica's adapters to the others. Ctrl-C or SIGTERM stops the router, then the replicas.

    python -m backend.cluster --replicas 2 [--port 9000] [--host 0.0.0.0]

LORA_BASE_MODEL, LORA_ADAPTER_DIR and every other LORA_<NAME> as for backend.serve (default: the demo). The replicas
share this machine's cores: LORA_NUM_THREADS defaults to each one's share (torch threads of several engines on the
same cores made 2 replicas on 2 cores 25 to 40 times slower: benchmarks/bench_cluster.py --threads 2)."""

import argparse
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from backend.config import ENV_PREFIX, REPO_ROOT
from backend.serve import PORTS, model_env, wait_until
from client.server import Router, free_port, terminate

THREADS = ENV_PREFIX + "NUM_THREADS"


@dataclass
class Replica:
    """python -m backend.serve with ports of its own."""

    env: dict[str, str]
    ports: dict[str, int] = field(default_factory=lambda: {name: free_port() for name in PORTS})
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.ports['OPENAI_PORT']}"

    def start(self) -> "Replica":
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"replica-{self.ports['OPENAI_PORT']}.log"
        env = {**self.env, **{name: str(port) for name, port in self.ports.items()}}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "backend.serve"],
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only, which stops the router first
            )
        return self

    def describe(self) -> str:
        p = self.ports
        return (
            f"OpenAI {self.url}/v1, Triton HTTP :{p['HTTP_PORT']} gRPC :{p['GRPC_PORT']}"
            f" metrics :{p['METRICS_PORT']} (log {self.log_path})"
        )

    def stop(self) -> int:
        return terminate(self.process, 120)  # serve stops its OpenAI server (30 s) then tritonserver (60 s)


@dataclass
class Cluster:
    replicas: list[Replica]
    router: Router

    def stop(self) -> bool:
        """The router first, so nothing new arrives, then every replica at once; True if all exited cleanly."""
        clean = self.router.stop() == 0
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        codes = [replica.stop() for replica in self.replicas]  # each one waited for
        return clean and codes == [0] * len(codes)


def share_of_cores(replicas: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // replicas)


def start_cluster(replicas: int, port: int | None = None, host: str = "127.0.0.1", env=os.environ) -> Cluster:
    """Replicas started at once, the router once each answers /health; everything stopped if one does not."""
    env = model_env(env)
    env[THREADS] = env.get(THREADS) or str(share_of_cores(replicas))
    started = [Replica(env).start() for _ in range(replicas)]
    router = Router([r.url for r in started], host=host, **({"port": port} if port else {}))
    cluster = Cluster(started, router)
    try:
        for replica in started:
            if not wait_until(f"{replica.url}/health", replica.process, 600):
                raise RuntimeError(f"replica {replica.url} did not start (log: {replica.log_path})")
        router.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def watch(cluster: Cluster, stop: threading.Event) -> None:
    """Until stop, tells of each replica that exits (its adapters go to the others); returns if the router does."""
    gone = set()
    while not stop.wait(0.5):
        if cluster.router.process.poll() is not None:
            print(f"cluster: the router exited ({cluster.router.process.returncode}); stopping", file=sys.stderr)
            return
        for i, replica in enumerate(cluster.replicas):
            if i not in gone and replica.process.poll() is not None:
                gone.add(i)
                print(
                    f"cluster: replica {i} exited ({replica.process.returncode}); see {replica.log_path}",
                    file=sys.stderr,
                )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=9000, help="the router's port (%(default)s)")
    parser.add_argument("--host", default="0.0.0.0", help="the router's address (%(default)s)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # while starting, SIGTERM stops it all as Ctrl-C does
    cluster = start_cluster(args.replicas, args.port, args.host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threads = cluster.replicas[0].env[THREADS]
    print(f"cluster: router http://localhost:{args.port}/v1 (log {cluster.router.log_path})", flush=True)
    for i, replica in enumerate(cluster.replicas):
        print(f"  replica {i}: {replica.describe()}, {threads} torch thread(s)", flush=True)
    print("route by adapter: header x-session-id: <adapter> (client.api.routing_headers); Ctrl-C stops all", flush=True)
    watch(cluster, stop)
    return 0 if cluster.stop() and stop.is_set() else 1


if __name__ == "__main__":
    sys.exit(main())
