"""Start and stop a local tritonserver on the model repository (used by the demo and the tests)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_repository(dst: Path, **parameters: str) -> Path:
    """A copy of model_repository/ with these lora_llm config.pbtxt parameters set (e.g. lora_backend="triton")."""
    shutil.copytree(REPO_ROOT / "model_repository", dst)
    config = Path(dst) / "lora_llm" / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        text, n = re.subn(rf'(key: "{key}", value: {{ string_value: )"[^"]*"', rf'\1"{value}"', text)
        if n != 1:
            raise KeyError(f"lora_llm has no parameter {key!r}")
    config.write_text(text)
    return Path(dst)


def tritonserver_binary() -> str:
    local = REPO_ROOT / ".venv" / "bin" / "tritonserver"
    found = str(local) if local.exists() else shutil.which("tritonserver")
    if not found:
        raise FileNotFoundError("tritonserver not found: run scripts/setup.sh")
    return found


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """The status of GET url, or None while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def terminate(process: subprocess.Popen | None, timeout: float, group: bool = False) -> int:
    """SIGTERM, then SIGKILL (to its process group too) if it has not exited within `timeout` s."""
    if process is None or process.poll() is not None:
        return process.returncode if process else 0
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL) if group else process.kill()
        return process.wait()


def wait_started(server, ready: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    """Returns once ready() holds; raises if the server's process exits first, or stops it and raises if
    `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{what} exited ({server.process.returncode}):\n{server.log_tail()}")
        if ready():
            return
        time.sleep(every)
    server.stop()
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s:\n{server.log_tail()}")


@dataclass
class TritonServer:
    repository: Path = REPO_ROOT / "model_repository"
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    models: list[str] | None = None  # load only these (explicit model control); None = all
    log_path: Path | None = None
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def start(self, timeout: float = 300.0) -> "TritonServer":
        cmd = [
            tritonserver_binary(),
            "--model-repository",
            str(self.repository),
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
        ]
        if self.models is not None:
            cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models)]
        self.log_path = (
            Path(self.log_path)
            if self.log_path
            else Path(os.environ.get("TMPDIR", "/tmp")) / f"tritonserver-{self.http_port}.log"
        )
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True
            )
        wait_started(self, self.ready, timeout, "tritonserver", every=0.5)
        return self

    def ready(self) -> bool:
        """Models ready, and the metrics service up: tritonserver starts it after the HTTP service (some 40 ms
        later), so a metrics read right after readiness alone was once refused."""
        return (
            http_status(f"http://{self.http_url}/v2/health/ready", timeout=2) == 200
            and http_status(f"http://localhost:{self.metrics_port}/metrics", timeout=2) == 200
        )

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a user's Ctrl-C would; the whole process group is killed if it does not exit."""
        return terminate(self.process, timeout, group=True)

    def processes(self) -> dict[str, psutil.Process]:
        """tritonserver and its Python stubs, each stub named by the model instance it runs (lora_llm_0_0)."""
        root = psutil.Process(self.process.pid)
        found = {"tritonserver": root}
        for child in root.children(recursive=True):
            try:
                args = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            found[args[-2] if "python_backend_stub" in args[0] and len(args) > 2 else child.name()] = child
        return found

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) if self.log_path else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://localhost:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str | None) -> float:
        """Sum of a Prometheus metric over its series whose labels include `labels` (a label given as
        None: the series has no such label, e.g. adapter=None for the series over all adapters)."""
        total = 0.0
        for series, value in re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", self.metrics(), re.M):
            if all((f'{k}="{v}"' in series) if v is not None else (f'{k}="' not in series) for k, v in labels.items()):
                total += float(value)
        return total

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class OpenAIServer:
    """The OpenAI server (python -m backend.serving.openai_server) in front of a running tritonserver."""

    triton_url: str
    model_dir: Path | None = None  # the base model folder (its tokenizer); None: the server's default
    adapter_dir: Path | None = None
    args: list[str] = field(default_factory=list)  # more of its command-line options
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def start(self, timeout: float = 60.0, wait_ready: bool = True) -> "OpenAIServer":
        cmd = [
            sys.executable,
            "-m",
            "backend.serving.openai_server",
            "--triton-url",
            self.triton_url,
            "--port",
            str(self.port),
        ]
        cmd += [*self.folder_args(), "--host", "127.0.0.1", *self.args]
        self.log_path = Path(self.log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"openai-{self.port}.log")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        answers = (lambda: self.health() is not None) if not wait_ready else (lambda: self.health() == 200)
        wait_started(self, answers, timeout, "the OpenAI server")
        return self

    def folder_args(self) -> list[str]:
        folders = {"--model-dir": self.model_dir, "--adapter-dir": self.adapter_dir}
        return [arg for option, folder in folders.items() if folder is not None for arg in (option, str(folder))]

    def health(self) -> int | None:
        """The status of GET /health, or None while nothing answers."""
        return http_status(f"{self.url}/health")

    def stop(self, timeout: float = 30.0) -> int:
        return terminate(self.process, timeout)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) if self.log_path else ""

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# vllm-router's settings in front of our replicas: the breaker opens on a worker's second failed attempt and the
# retry after it goes to another worker, so a killed replica costs no request that has not started streaming;
# health checks every second bring a restarted one back. Measured in tests/test_cluster.py.
ROUTER_SETTINGS = [
    "--policy=consistent_hash",  # on client.api.routing_headers: one adapter, one replica
    "--health-check-endpoint=/health",
    "--health-check-interval-secs=1",
    "--health-failure-threshold=2",
    "--health-success-threshold=1",
    "--retry-max-retries=4",  # attempts, the first one included
    "--retry-initial-backoff-ms=50",
    "--retry-max-backoff-ms=500",
    "--cb-failure-threshold=2",
    "--cb-timeout-duration-secs=2",
    "--log-level=warning",
]


@dataclass
class Router:
    """vllm-router (ROUTER_SETTINGS) in front of OpenAI servers."""

    worker_urls: list[str]
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def start(self, timeout: float = 60.0) -> "Router":
        cmd = [str(Path(sys.executable).with_name("vllm-router")), *ROUTER_SETTINGS, "--worker-urls", *self.worker_urls]
        cmd += ["--host", self.host, "--port", str(self.port), "--prometheus-port", str(self.metrics_port)]
        self.log_path = Path(self.log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"router-{self.port}.log")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_started(self, lambda: self.healthy_workers() == len(self.worker_urls), timeout, "vllm-router")
        return self

    def healthy_workers(self) -> int | None:
        """How many workers the router's health checks pass (GET /readiness), or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/readiness", timeout=2) as r:
                return json.load(r)["healthy_workers"]
        except urllib.error.HTTPError as e:
            return json.load(e).get("healthy_workers", 0)
        except (OSError, ValueError, KeyError):
            return None

    def stop(self, timeout: float = 15.0) -> int:
        return terminate(self.process, timeout)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) if self.log_path else ""
