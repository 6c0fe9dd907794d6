"""perf_analyzer / GenAI-Perf input data for the text models: requests spread over many adapters with a
chosen popularity, one `lora_name` per request.

    python -m client.perf_data --adapters .demo/adapters --popularity 80/20 --requests 200 -o mix.json
    perf_analyzer -m ensemble -i grpc --async --streaming --input-data mix.json --concurrency-range 8
    scripts/genai_perf.sh profile -m ensemble ... -- --input-data mix.json

Popularity: uniform (random), round-robin, zipf (the k-th most popular has weight 1/k), 80/20 (80% of
the requests go to the most popular 20% of the adapters, as in NVIDIA NIM's LoRA benchmarks).
"""

import argparse
import inspect
import json
import random
import string
import textwrap
from pathlib import Path

POPULARITY = ("uniform", "round-robin", "zipf", "80/20")


def words() -> list[str]:
    """Words of docstrings every Python install has: prompts without a download."""
    text = " ".join(inspect.getdoc(m) or "" for m in (string, textwrap, json, random, argparse, inspect))
    return text.split()


def choose(adapters: list[str], popularity: str, n: int, rng: random.Random) -> list[str]:
    if popularity == "round-robin":
        return [adapters[i % len(adapters)] for i in range(n)]
    if popularity == "uniform":
        return [rng.choice(adapters) for _ in range(n)]
    if popularity == "zipf":
        return rng.choices(adapters, weights=[1 / (k + 1) for k in range(len(adapters))], k=n)
    hot = adapters[: max(1, len(adapters) // 5)]
    return [rng.choice(hot) if rng.random() < 0.8 else rng.choice(adapters) for _ in range(n)]


def input_data(
    adapters: list[str], popularity: str, requests: int, prompt_words: int, max_tokens: int, stream: bool, seed: int
) -> dict:
    rng = random.Random(seed)
    vocab = words()
    data = []
    for name in choose(adapters, popularity, requests, rng):
        start = rng.randrange(len(vocab) - prompt_words)
        entry = {"text_input": [" ".join(vocab[start : start + prompt_words])], "max_tokens": [max_tokens]}
        entry |= {"lora_name": [name]} if name else {}
        entry |= {"stream": [True]} if stream else {}
        data.append(entry)
    return {"data": data}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m client.perf_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", required=True, help="an adapter folder (its subfolders) or name,name,...")
    p.add_argument("--popularity", choices=POPULARITY, default="80/20")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-stream", action="store_true", help="for unary models (lora_text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", type=Path, required=True)
    a = p.parse_args(argv)
    folder = Path(a.adapters)
    names = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else a.adapters.split(",")
    data = input_data(names, a.popularity, a.requests, a.prompt_words, a.max_tokens, not a.no_stream, a.seed)
    a.out.write_text(json.dumps(data, indent=1))
    counts = {n: sum(d.get("lora_name") == [n] for d in data["data"]) for n in names}
    print(f"{a.out}: {a.requests} requests; per adapter: {counts}")


if __name__ == "__main__":
    main()
