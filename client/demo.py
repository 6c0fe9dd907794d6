"""The demo: tritonserver on model_repository/ and the OpenAI server in front of it, serving
SmolLM2-135M-Instruct and four adapters trained on it (demo/). The same questions go to the base model
and every adapter at once, three ways: chat through the OpenAI API, lora_text over gRPC, and streamed
through the ensemble. The answers are printed side by side, then both servers stop.

    python -m client.demo [--random] [--max-tokens 64]
"""

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from backend.naming import adapter_folders
from backend.serving.openai_server.chat import ChatTemplate, read_template
from client.api import infer, stream
from client.server import OpenAIServer, TritonServer

QUESTIONS = ["What is the capital of Germany?", "Give me a tip for sleeping well."]
RANDOM_PROMPTS = ["Beautiful is better than"]
DOORS = ("openai", "lora_text", "ensemble")


def build(random: bool) -> Path:
    if random:
        from demo.builders import build_random_demo

        return build_random_demo()
    from demo.build import build_demo

    return build_demo()


class Asker:
    """One question to one adapter through one door; chat models get their chat template."""

    def __init__(self, triton: TritonServer, front: OpenAIServer, base_dir: Path, max_tokens: int):
        self.triton, self.max_tokens = triton, max_tokens
        self.openai = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)
        template, special = read_template(base_dir)
        self.template = ChatTemplate(template, special) if template else None

    def __call__(self, door: str, adapter: str | None, question: str) -> str:
        messages = [{"role": "user", "content": question}]
        if door == "openai":
            model, n = adapter or "base", self.max_tokens
            if self.template is None:
                return (
                    self.openai.completions.create(model=model, prompt=question, max_tokens=n, temperature=0)
                    .choices[0]
                    .text
                )
            reply = self.openai.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0)
            return reply.choices[0].message.content
        prompt = self.template.render(messages) if self.template else question
        values = dict(text_input=prompt, lora_name=adapter, max_tokens=self.max_tokens)
        if door == "ensemble":
            return "".join(c.text for c in stream(self.triton.grpc_url, "ensemble", stream=True, **values))
        return infer(self.triton.grpc_url, "grpc", "lora_text", **values).text


def show(question: str, answers: dict[tuple[str, str | None], str], adapters: list[str | None]) -> None:
    print(f"\nQ: {question}")
    width = max(len(a or "(base)") for a in adapters)
    for adapter in adapters:
        texts = [answers[door, adapter] for door in DOORS]
        lines = texts[0].strip().splitlines() or [""]
        print(f"  {adapter or '(base)':{width}}  {lines[0]}")
        for line in lines[1:]:
            print(f"  {'':{width}}  {line}")
        for door, text in zip(DOORS[1:], texts[1:]):
            if text != texts[0]:
                print(f"  {'':{width}}  ({door} answered differently: {text!r})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", action="store_true", help="the tiny random model (.demo/random): fast, but noise")
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args(argv)
    start = time.monotonic()
    print("building the demo model and adapters (once) ...", flush=True)
    assets = build(a.random)
    env = {ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters")}
    triton = TritonServer(env=env)
    print(f"starting tritonserver --model-repository model_repository (log {triton.log_path or 'in $TMPDIR'}) ...")
    with triton, OpenAIServer(triton.grpc_url, assets / "base", assets / "adapters") as front:
        print(f"ready after {time.monotonic() - start:.0f} s: Triton gRPC {triton.grpc_url}, OpenAI API {front.url}/v1")
        adapters = [None, *(f.name for f in adapter_folders(assets / "adapters"))]
        questions = RANDOM_PROMPTS if a.random else QUESTIONS
        jobs = [(door, adapter, q) for q in questions for adapter in adapters for door in DOORS]
        ask = Asker(triton, front, assets / "base", a.max_tokens)
        with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share engine steps
            texts = list(pool.map(lambda job: ask(*job), jobs))
        answers = dict(zip(jobs, texts))
        for q in questions:
            show(q, {(door, adapter): text for (door, adapter, qq), text in answers.items() if qq == q}, adapters)
        print(f"\n(each answer above came back the same through {', '.join(DOORS)}, unless shown)")
        if a.random:
            print("(a random base model and random adapters: the words are noise; which answers agree is the point)")
        steps, mixed = triton.metric("lora_engine_steps_total"), triton.metric("lora_engine_mixed_steps_total")
        widest = triton.metric("lora_engine_max_adapters_per_step")
        print(
            f"engine: {steps:.0f} steps, {mixed:.0f} of them mixing adapters, up to {widest:.0f} adapters in one step"
        )
    print(f"both servers stopped (exit code {triton.process.returncode}); {time.monotonic() - start:.0f} s in all")
    return triton.process.returncode


if __name__ == "__main__":
    sys.exit(main())
