"""One benchmark subject in its own process: PEFT's mixed-batch generate, the engine in-process, the
real tritonserver driven over gRPC streams, or the OpenAI server in front of it. Driven by
bench_serving.py over stdin / stdout, one JSON line each way:

    {"workload": {...}}  ->  {"requests": [{"adapter", "t_submit", "t_tokens", "output"}...], "seconds"}

    python -m benchmarks.subjects {peft,engine,server,openai} --assets DIR [--device cpu] [--dtype float32]
        [--set k=v ...]

--set changes an engine setting (EngineConfig field; a lora_llm parameter for the server) or, as
env:NAME=value, the server's environment: to compare settings side by side.
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.workloads import Shape, Workload, adapter_names

ENGINE_SETTINGS = {"max_loras": 32, "max_num_seqs": 32}


def split_settings(settings: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """--set values -> (engine settings over ENGINE_SETTINGS, environment variables)."""
    params = {k: str(v) for k, v in ENGINE_SETTINGS.items()}
    params |= {k: v for k, v in settings.items() if not k.startswith("env:")}
    return params, {k.removeprefix("env:"): v for k, v in settings.items() if k.startswith("env:")}


def request_record(index: int, adapter: str) -> dict:
    return {"index": index, "adapter": adapter, "t_submit": time.perf_counter(), "t_tokens": [], "output": []}


def left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids, attention mask) [B, longest]: prompts of different lengths padded on the left, as HF wants."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


class Peft:
    """PEFT's own model with every adapter loaded; a workload runs as batches of `concurrency` requests."""

    def __init__(self, assets: Path, shape: Shape, device: str, dtype: torch.dtype, settings: dict[str, str]):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(assets / "base", dtype=dtype).to(device)
        names = adapter_names(shape)
        model = PeftModel.from_pretrained(base, assets / "adapters" / names[0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(assets / "adapters" / name, adapter_name=name)
        model.generation_config.eos_token_id = None  # exactly max_new_tokens, as end_id=-1 elsewhere
        model.generation_config.pad_token_id = 0
        self.model, self.device = model.eval(), device

    def run(self, w: Workload, reqs: list[tuple[str, list[int]]]) -> list[dict]:
        from transformers import LogitsProcessor, LogitsProcessorList

        class Clock(LogitsProcessor):  # called once a step, as the step's logits are ready
            def __call__(self, input_ids, scores):
                sync()
                stamps.append(time.perf_counter())
                return scores

        def sync():
            if self.device == "cuda":
                torch.cuda.synchronize()

        records = []
        for i in range(0, len(reqs), w.concurrency):
            batch = reqs[i : i + w.concurrency]
            recs = [request_record(i + j, name) for j, (name, _) in enumerate(batch)]
            ids, mask = left_padded([p for _, p in batch], self.device)
            stamps: list[float] = []
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    adapter_names=[name or "__base__" for name, _ in batch],
                    max_new_tokens=w.new_tokens,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([Clock()]),
                )
            sync()
            for rec, row in zip(recs, out[:, ids.shape[1] :].tolist()):
                rec["output"], rec["t_tokens"] = row, stamps[: len(row)]
            records += recs
        return records


class InProcess:
    """backend.engine.engine.Engine in this process; a closed loop keeps `concurrency` requests in flight."""

    def __init__(self, assets: Path, shape: Shape, device: str, dtype: str, settings: dict[str, str]):
        from backend.config import EngineConfig
        from backend.engine.engine import Engine

        params, env = split_settings({"device": device, "dtype": dtype} | settings)
        os.environ.update(env)
        paths = {"base_model": str(assets.resolve() / "base"), "adapter_dir": str(assets.resolve() / "adapters")}
        self.engine = Engine(EngineConfig.from_parameters(params | paths, env={})).start()

    def run(self, w: Workload, reqs: list[tuple[str, list[int]]]) -> list[dict]:
        from backend.engine.request import GenerationRequest

        records: list[dict] = []
        done = threading.Event()
        lock = threading.Lock()

        def submit(i: int) -> None:
            name, ids = reqs[i]
            rec = request_record(i, name)
            records.append(rec)

            def emit(out) -> None:
                now = time.perf_counter()
                rec["t_tokens"] += [now] * len(out.token_ids)
                rec["output"] += out.token_ids
                if out.error is not None:
                    rec["error"] = out.error.message
                if out.finish_reason or out.error is not None:
                    finished()

            req = GenerationRequest(ids, w.new_tokens, lora_name=name, stream=True)  # no stop ids: all new_tokens
            self.engine.submit(req, emit)

        def finished() -> None:
            with lock:
                state["done"] += 1
                nxt = state["next"]
                state["next"] += nxt < len(reqs)
                if state["done"] == len(reqs):
                    done.set()
            if nxt < len(reqs):
                submit(nxt)

        state = {"next": w.concurrency, "done": 0}
        for i in range(min(w.concurrency, len(reqs))):
            submit(i)
        done.wait()
        return records

    def close(self) -> None:
        self.engine.shutdown()


class Server:
    """tritonserver on a copy of model_repository/ serving lora_llm alone; each request is its own
    gRPC stream with stream=true (tritonclient's asyncio client), `concurrency` in flight."""

    def __init__(self, assets: Path, shape: Shape, device: str, dtype: str, settings: dict[str, str]):
        from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
        from client.server import TritonServer, copy_repository

        self.tmp = tempfile.TemporaryDirectory(prefix="bench-server-")
        params, env = split_settings({"device": device, "dtype": dtype} | settings)
        repo = copy_repository(Path(self.tmp.name) / "repo", **params)
        env = {ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters")} | env
        log = Path(self.tmp.name) / "tritonserver.log"
        self.server = TritonServer(repository=repo, env=env, models=["lora_llm"], log_path=log).start()

    def run(self, w: Workload, reqs: list[tuple[str, list[int]]]) -> list[dict]:
        return asyncio.run(self._run(w, reqs))

    async def _run(self, w: Workload, reqs) -> list[dict]:
        import tritonclient.grpc.aio as aio

        from client.api import make_inputs

        client = aio.InferenceServerClient(self.server.grpc_url)
        queue: asyncio.Queue = asyncio.Queue()
        for i, (name, ids) in enumerate(reqs):
            queue.put_nowait((i, name, ids))
        records: list[dict] = []

        async def one(i: int, name: str, ids: list[int]) -> None:
            inputs = make_inputs(
                aio, input_ids=ids, lora_name=name or None, max_tokens=w.new_tokens, end_id=-1, stream=True
            )

            async def request():  # the ids are all this client reads
                yield {"model_name": "lora_llm", "inputs": inputs, "outputs": [aio.InferRequestedOutput("output_ids")]}

            rec = request_record(i, name)
            records.append(rec)
            async for result, error in client.stream_infer(request()):
                now = time.perf_counter()
                if error is not None:
                    rec["error"] = str(error)
                    break
                tokens = result.as_numpy("output_ids").reshape(-1).tolist()
                rec["t_tokens"] += [now] * len(tokens)
                rec["output"] += tokens

        async def worker() -> None:
            while not queue.empty():
                await one(*queue.get_nowait())

        try:
            await asyncio.gather(*(worker() for _ in range(w.concurrency)))
        finally:
            await client.close()
        return records

    def close(self) -> None:
        code = self.server.stop()
        if code != 0:
            print(f"tritonserver exited with {code}:\n{self.server.log_tail()}", file=sys.stderr)
        self.tmp.cleanup()


class OpenAI(Server):
    """The same tritonserver with the OpenAI server in front of it: each request is a streamed
    /v1/completions call with a token-id prompt (aiohttp reads the server-sent events; vLLM's
    return_token_ids gives each chunk's ids), `concurrency` in flight."""

    def __init__(self, assets: Path, shape: Shape, device: str, dtype: str, settings: dict[str, str]):
        from client.server import OpenAIServer

        super().__init__(assets, shape, device, dtype, settings)
        log = Path(self.tmp.name) / "openai.log"
        self.front = OpenAIServer(self.server.grpc_url, assets / "base", assets / "adapters", log_path=log).start()

    async def _run(self, w: Workload, reqs) -> list[dict]:
        import aiohttp

        queue: asyncio.Queue = asyncio.Queue()
        for i, (name, ids) in enumerate(reqs):
            queue.put_nowait((i, name, ids))
        records: list[dict] = []
        url = f"{self.front.url}/v1/completions"

        async def one(session, i: int, name: str, ids: list[int]) -> None:
            body = dict(model=name or "base", prompt=ids, max_tokens=w.new_tokens, temperature=0, stream=True)
            body |= dict(ignore_eos=True, return_token_ids=True)
            rec = request_record(i, name)
            records.append(rec)
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    rec["error"] = await response.text()
                    return
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    now = time.perf_counter()
                    tokens = json.loads(line[6:])["choices"][0]["token_ids"]
                    rec["t_tokens"] += [now] * len(tokens)
                    rec["output"] += tokens

        async def worker(session) -> None:
            while not queue.empty():
                await one(session, *queue.get_nowait())

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            await asyncio.gather(*(worker(session) for _ in range(w.concurrency)))
        return records

    def close(self) -> None:
        self.front.stop()
        super().close()


SYSTEMS = {"peft": Peft, "engine": InProcess, "server": Server, "openai": OpenAI}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("system", choices=list(SYSTEMS))
    p.add_argument("--assets", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    # Replies go to the original stdout; anything a library prints goes to stderr.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    shape = Shape(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.stdin.readline()).items()})
    dtype = getattr(torch, a.dtype) if a.system == "peft" else a.dtype
    settings = dict(kv.split("=", 1) for kv in a.set)
    subject = SYSTEMS[a.system](a.assets, shape, a.device, dtype, settings)
    print(json.dumps({"ready": a.system}), file=reply, flush=True)
    for line in sys.stdin:
        w = Workload(**json.loads(line))
        reqs = w.requests(shape, a.assets)
        start = time.perf_counter()
        records = subject.run(w, reqs)
        seconds = time.perf_counter() - start
        records.sort(key=lambda r: r["index"])
        print(json.dumps({"requests": records, "seconds": seconds}), file=reply, flush=True)
    if hasattr(subject, "close"):
        subject.close()


if __name__ == "__main__":
    main()
