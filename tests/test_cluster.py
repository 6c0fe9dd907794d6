"""Two replicas (tritonserver + the OpenAI server each) behind vllm-router with backend/cluster.py's settings, through
the openai SDK: each adapter's requests on one replica, outputs as one server's, a replica killed under load and
restarted on its ports, and `python -m backend.cluster` itself. Which replica served what is read from each one's
lora_requests_total{adapter=...}, never from client timing."""

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from backend.cluster import THREADS, share_of_cores
from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from client.api import routing_headers
from client.server import REPO_ROOT, OpenAIServer, Router, TritonServer, free_port, http_status
from tests.conftest import ADAPTERS

pytestmark = pytest.mark.heavy

# 24 routing keys: with consistent hashing each replica gets some (all on one: 2 in 2^24)
NAMES = [f"{name}-{i}" for i in range(6) for name in ADAPTERS]
PROMPT = [5, 17, 42, 99, 7]


@dataclass
class Replica:
    """A tritonserver and the OpenAI server in front of it, killed and restarted on the same ports."""

    triton: TritonServer
    front: OpenAIServer

    def start(self) -> "Replica":
        self.triton.start()
        self.front.start()
        return self

    def kill(self) -> None:
        """SIGKILL to both (tritonserver's whole group: its Python stubs outlive it otherwise), then reaped."""
        os.killpg(self.triton.process.pid, signal.SIGKILL)
        self.front.process.kill()
        self.triton.process.wait()
        self.front.process.wait()

    def stop(self) -> None:
        self.front.stop()
        self.triton.stop()

    def served(self, names: list[str]) -> dict[str, float]:
        return {name: self.triton.metric("lora_requests_total", adapter=name) for name in names}


@dataclass
class Outcome:
    name: str
    after_kill: bool  # sent once the killed replica's processes were reaped
    stream: bool
    error: str = ""
    finished: bool = False  # the answer ended with a finish_reason


@pytest.fixture(scope="module")
def folders(assets, tmp_path_factory) -> tuple[Path, Path]:
    """The base model and a shared adapter folder with NAMES (copies of the test adapters)."""
    adapters = tmp_path_factory.mktemp("cluster") / "adapters"
    for name in NAMES:
        shutil.copytree(assets / "adapters" / name.rsplit("-", 1)[0], adapters / name)
    return assets / "base", adapters


@pytest.fixture(scope="module")
def replicas(folders):
    base, adapters = folders
    env = {ENV_BASE_MODEL: str(base), ENV_ADAPTER_DIR: str(adapters), THREADS: str(share_of_cores(2))}
    started = []
    try:
        for _ in range(2):
            triton = TritonServer(env=env)
            started.append(Replica(triton, OpenAIServer(triton.grpc_url, model_dir=base, adapter_dir=adapters)))
            started[-1].start()
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture(scope="module")
def router(replicas):
    router = Router([r.front.url for r in replicas]).start()
    try:
        yield router
    finally:
        assert router.stop() == 0, router.log_tail()


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def ask(client: openai.OpenAI, name: str, max_tokens: int = 4, stream: bool = False, live: dict | None = None) -> bool:
    """One greedy completion through the router; True if it ended with a finish_reason. live: name -> the chunks
    its stream has received, while it is open."""
    kw = dict(model=name, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_headers=routing_headers(name))
    kw["extra_body"] = {"ignore_eos": True}
    if not stream:
        return client.completions.create(**kw).choices[0].finish_reason is not None
    live, finished = {} if live is None else live, False
    try:
        for i, chunk in enumerate(client.completions.create(stream=True, **kw)):
            live[name] = i + 1
            finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
    finally:
        live.pop(name, None)
    return finished


def ask_all(client: openai.OpenAI, names: list[str]) -> list[BaseException]:
    """One request per name, eight at a time; the errors."""
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, client, n) for n in names]
        return [f.exception() for f in futures if f.exception()]


def served_by(replicas: list[Replica], names: list[str], send) -> dict[str, list[float]]:
    """name -> how many of its requests each replica counted while send() ran."""
    before = [r.served(names) for r in replicas]
    send()
    after = [r.served(names) for r in replicas]
    return {n: [a[n] - b[n] for a, b in zip(after, before)] for n in names}


def owners(replicas: list[Replica], client: openai.OpenAI, names: list[str]) -> dict[str, int]:
    """name -> the replica that served one request for it each."""
    errors = []
    counts = served_by(replicas, names, lambda: errors.extend(ask_all(client, names)))
    assert errors == []
    assert all(sorted(c) == [0, 1] for c in counts.values()), counts
    return {n: c.index(1) for n, c in counts.items()}


def test_each_adapter_is_served_by_one_replica_and_both_serve(replicas, router):
    client = sdk(router.url)
    errors = []
    counts = served_by(replicas, NAMES, lambda: errors.extend(ask_all(client, NAMES * 3)))
    assert errors == []
    assert all(sorted(c) == [0, 3] for c in counts.values()), counts
    per_replica = [sum(1 for c in counts.values() if c[i]) for i in range(2)]
    assert min(per_replica) > 0, per_replica


def test_outputs_through_the_router_equal_one_servers(replicas, router):
    via_router, alone = sdk(router.url), sdk(replicas[0].front.url)
    for name in NAMES[:8]:
        kw = dict(model=name, prompt="The capital of", max_tokens=12, temperature=0)
        kw["extra_body"] = {"return_token_ids": True}
        routed = via_router.completions.create(extra_headers=routing_headers(name), **kw).choices[0]
        single = alone.completions.create(**kw).choices[0]
        assert (routed.token_ids, routed.text) == (single.token_ids, single.text), name
        streamed = via_router.completions.create(stream=True, extra_headers=routing_headers(name), **kw)
        assert [t for c in streamed if c.choices for t in c.choices[0].token_ids] == single.token_ids, name


def attempt(client: openai.OpenAI, outcome: Outcome, max_tokens: int, live: dict | None = None) -> Outcome:
    try:
        outcome.finished = ask(client, outcome.name, max_tokens, outcome.stream, live)
    except Exception as e:  # every failure counted with its error
        outcome.error = f"{type(e).__name__}: {e} ({e.__cause__!r})"
    return outcome


def load(client: openai.OpenAI, names: list[str], killed: threading.Event, outcomes: list, after: int):
    """Requests for names in turn, every other one streamed, until `after` of them were sent after the kill."""
    sent_after, i = 0, 0
    while sent_after < after:
        name, i = names[i % len(names)], i + 1
        outcomes.append(attempt(client, Outcome(name, killed.is_set(), stream=i % 2 == 0), 32))  # after_kill first
        sent_after += outcomes[-1].after_kill


def wait_for(condition, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(every)


def test_a_killed_replica_costs_no_request_sent_after_it_and_rejoins(replicas, router, folders):
    client = sdk(router.url)
    owner = owners(replicas, client, NAMES)
    victim, survivor = replicas[1], replicas[0]
    victims = [n for n in NAMES if owner[n] == 1]

    # four clients over every adapter, unary and streamed in turn; once the victim serves them, a long stream for one
    # of its adapters, and the kill when that stream's first chunk has come: more than 200 tokens are still to come
    killed, outcomes, live = threading.Event(), [], {}
    before = {"victim": victim.served(NAMES), "survivor": survivor.served(victims)}
    threads = [threading.Thread(target=load, args=(client, NAMES[k::4], killed, outcomes, 12)) for k in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(victim.served(NAMES).values()) >= sum(before["victim"].values()) + 4, 60, "load on the victim")
    probe = Outcome(victims[0], after_kill=False, stream=True)
    threads.append(threading.Thread(target=lambda: outcomes.append(attempt(client, probe, 240, live))))
    threads[-1].start()
    wait_for(lambda: 0 < live.get(probe.name, 0) < 40, 60, "the long stream under way", every=0.002)
    victim.kill()
    killed.set()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"

    answered = [o for o in outcomes if not o.error and o.finished]
    failed = [o for o in outcomes if o.error]
    in_flight = [o for o in failed if not o.after_kill]
    after = [o for o in outcomes if o.after_kill]
    print(
        f"\nfailover: {len(outcomes)} sent, {len(answered)} answered, {len(failed)} failed"
        f" ({len(in_flight)} in flight at the kill); after the kill {len(after)} sent,"
        f" {sum(1 for o in after if o.error)} failed; errors: {sorted({o.error[:90] for o in failed})}"
    )
    assert len(answered) + len(failed) == len(outcomes), "an answer ended without a finish_reason and no error"
    assert all("Timeout" not in o.error for o in failed), [o.error for o in failed]
    assert probe.error, "the stream under way at the kill did not fail"
    assert [o.error for o in after if o.error] == []
    survivor_gain = sum(survivor.served(victims).values()) - sum(before["survivor"].values())
    assert survivor_gain >= sum(1 for o in after if o.name in victims and not o.error)

    # rejoin: the same ports again; once the router's health check passes it, its adapters come back to it
    victim.start()
    wait_for(lambda: router.healthy_workers() == 2, 30, "the router's health check passing the restarted replica")
    deadline, errors, rounds = time.monotonic() + 30, [], 0
    while True:
        counts, rounds = served_by([victim], victims, lambda: errors.extend(ask_all(client, victims))), rounds + 1
        if all(c == [1] for c in counts.values()) or time.monotonic() > deadline:
            break
    print(f"rejoin: all {len(victims)} of its adapters back on it in round {rounds} of requests")
    assert errors == []
    assert all(c == [1] for c in counts.values()), counts

    # adapters new to the shared folder: each on one replica, the restarted one among them
    adapters = folders[1]
    fresh = [f"fresh-{i}" for i in range(16)]
    for name in fresh:
        shutil.copytree(adapters / NAMES[0], adapters / name)
    assert sorted(set(owners(replicas, client, fresh).values())) == [0, 1]


def read_lines(process: subprocess.Popen, lines: queue.Queue) -> None:
    for line in process.stdout:
        lines.put(line)
    lines.put(None)


def test_launcher_serves_through_its_router_and_stops_everything(assets, tmp_path):
    port = free_port()
    env = {**os.environ, ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters")}
    cmd = [sys.executable, "-m", "backend.cluster", "--replicas", "2", "--port", str(port), "--host", "127.0.0.1"]
    process = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env={**env, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, text=True
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(process, lines), daemon=True).start()
    printed = []
    try:
        while not printed or not printed[-1].startswith("route by adapter"):
            line = lines.get(timeout=300)
            assert line is not None, f"the launcher exited ({process.wait()}): {''.join(printed)}"
            printed.append(line)
        assert printed[0].startswith(f"cluster: router http://localhost:{port}/v1"), printed
        fronts = [line.split("OpenAI ")[1].split("/v1")[0] for line in printed if "replica" in line]
        assert len(fronts) == 2 and all(http_status(f"{url}/health") == 200 for url in fronts), printed
        client = sdk(f"http://localhost:{port}")
        assert all(ask(client, name) for name in ADAPTERS)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=150) == 0
        assert [http_status(f"{url}/health") for url in [*fronts, f"http://localhost:{port}"]] == [None] * 3
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=150)
