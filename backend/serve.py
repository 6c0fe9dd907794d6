"""One command serves it all (`make serve`): tritonserver on model_repository/ and the OpenAI server in
front of it, until SIGTERM or SIGINT stops both (the OpenAI server first, so nothing new reaches Triton).

    python -m backend.serve

Variables: LORA_BASE_MODEL, LORA_ADAPTER_DIR (default: the demo, built on first use), HTTP_PORT,
GRPC_PORT, METRICS_PORT (Triton's 8000, 8001, 8002) and OPENAI_PORT (9000). Every other LORA_<NAME>
reaches lora_llm as usual."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from backend.config import DEMO_DIR, ENV_ADAPTER_DIR, ENV_BASE_MODEL, REPO_ROOT
from client.server import http_status, terminate, tritonserver_binary

PORTS = {"HTTP_PORT": 8000, "GRPC_PORT": 8001, "METRICS_PORT": 8002, "OPENAI_PORT": 9000}


def ports(env=os.environ) -> dict[str, int]:
    return {name: int(env.get(name) or default) for name, default in PORTS.items()}


def wait_until(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """True once url answers 200; False if the process exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if http_status(url, timeout=2) == 200:
            return True
        time.sleep(0.5)
    return False


def model_env(env=os.environ) -> dict[str, str]:
    """env with the model set: the demo (built on first use) unless LORA_BASE_MODEL names one."""
    env = dict(env)
    if not env.get(ENV_BASE_MODEL):
        subprocess.run([sys.executable, "-m", "demo.build"], cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        env[ENV_BASE_MODEL], env[ENV_ADAPTER_DIR] = str(DEMO_DIR / "base"), str(DEMO_DIR / "adapters")
    return env


def main() -> int:
    p = ports()
    env = model_env()
    model_dir = Path(env[ENV_BASE_MODEL]).resolve()
    adapter_dir = Path(env.get(ENV_ADAPTER_DIR) or DEMO_DIR / "adapters").resolve()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    triton_cmd = [tritonserver_binary(), "--model-repository", str(REPO_ROOT / "model_repository")]
    triton_cmd += [f"--{k.split('_')[0].lower()}-port={v}" for k, v in p.items() if k != "OPENAI_PORT"]
    # own sessions: a terminal's Ctrl-C reaches this process only, which stops them in order
    triton = subprocess.Popen(triton_cmd, env=env, start_new_session=True)
    front = None
    try:
        if not wait_until(f"http://localhost:{p['HTTP_PORT']}/v2/health/ready", triton, 600) or stop.is_set():
            return triton.poll() or 1
        front_cmd = [
            sys.executable,
            "-m",
            "backend.serving.openai_server",
            "--triton-url",
            f"localhost:{p['GRPC_PORT']}",
        ]
        front_cmd += ["--model-dir", str(model_dir), "--adapter-dir", str(adapter_dir), "--port", str(p["OPENAI_PORT"])]
        front = subprocess.Popen(front_cmd, env=env, cwd=REPO_ROOT, start_new_session=True)
        if wait_until(f"http://localhost:{p['OPENAI_PORT']}/health", front, 60):
            print(
                f"serving: OpenAI API http://localhost:{p['OPENAI_PORT']}/v1, Triton HTTP :{p['HTTP_PORT']}"
                f" gRPC :{p['GRPC_PORT']} metrics :{p['METRICS_PORT']} (Ctrl-C stops both)",
                flush=True,
            )
        while not stop.wait(0.5):
            if triton.poll() is not None or front.poll() is not None:
                print("serve: a server exited; stopping the other", file=sys.stderr, flush=True)
                break
    finally:
        # uvicorn ends a graceful shutdown by raising the signal again: -SIGTERM is its clean exit
        codes = [terminate(front, 30) in (0, -signal.SIGTERM)] if front else []
        codes.append(terminate(triton, 60, group=True) == 0)
    return 0 if stop.is_set() and all(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
