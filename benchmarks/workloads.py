"""The benchmark's model, adapters and workloads, built locally and deterministically.

The anchor shape: a random Llama (vocab 2000, hidden 512, intermediate 1376, 8 layers, 8 heads /
4 KV heads; 25.3M parameters) and r=16 alpha=32 adapters on q, k, v, o. The smollm2 shape: the demo's
real model (SmolLM2-135M-Instruct: 30 layers, vocab 49152) with random r=16 adapters on q, k, v, o,
and chat-formatted prompts of 64-256 tokens.
"""

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from client.perf_data import choose
from demo.builders import build_model


@dataclass(frozen=True)
class Shape:
    vocab_size: int = 2000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024  # the prefix workload's 512-token system prompts, turns and answers fit
    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    num_adapters: int = 128
    base: str = ""  # "": a random Llama of the sizes above; "smollm2": the demo's real model (sizes ignored)


ANCHOR = Shape()
SMOLLM2 = Shape(vocab_size=49152, num_hidden_layers=30, max_position_embeddings=8192, num_adapters=64, base="smollm2")
# Per-step overhead shows: 32 thin layers, where host work per layer and per step weighs most.
DEEP = Shape(hidden_size=128, intermediate_size=344, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2)
QUICK = Shape(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_adapters=12)
# For a GPU: a ~1B-parameter Llama (TinyLlama's layers; the vocabulary is what the local tokenizer reaches).
ONE_B = Shape(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    num_adapters=64,
)


HOT_SHARE = 0.8


@dataclass(frozen=True)
class Workload:
    name: str
    num_requests: int
    concurrency: int  # requests in flight at once (closed loop); PEFT runs batches of this size
    # "base", "one", "distinct", "zipf" (the 80/20 popularity of client.perf_data), "hot" (HOT_SHARE),
    # "prefix" (`distinct` adapters round-robin, each with its own system prompt of `system_len` tokens)
    adapters: str
    distinct: int = 0  # for "distinct" and "prefix": adapters cycled over the requests
    prompt_len: int = 32  # tokens; chat prompts: 2x..8x this; "prefix": the user turn after the system prompt
    new_tokens: int = 32
    system_len: int = 0
    seed: int = 0  # the round: each round sends other prompts (a prefix cache keeps no round's for the next)

    def requests(self, shape: Shape, assets: Path) -> list[tuple[str, list[int]]]:
        """(adapter name or "", prompt ids) per request; the same for every system in a round."""
        rng = random.Random(self.seed)
        names = adapter_names(shape)
        if self.adapters == "prefix":  # system prompts stay from round to round, as a tenant's do
            fixed = random.Random(-1)
            systems = [[1] + [fixed.randrange(4, shape.vocab_size) for _ in range(self.system_len - 1)] for _ in names]
            chosen = [i % self.distinct for i in range(self.num_requests)]
            turns = [[rng.randrange(4, shape.vocab_size) for _ in range(self.prompt_len)] for _ in chosen]
            return [(names[i], systems[i] + turn) for i, turn in zip(chosen, turns)]
        if shape.base:
            lengths = [rng.randint(2 * self.prompt_len, 8 * self.prompt_len) for _ in range(self.num_requests)]
            prompts = chat_prompts(assets / "base", lengths, rng)
        else:
            prompts = [
                [1] + [rng.randrange(4, shape.vocab_size) for _ in range(self.prompt_len - 1)]
                for _ in range(self.num_requests)
            ]
        pool, popularity = {
            "base": ([""], "round-robin"),
            "one": (names[:1], "round-robin"),
            "distinct": (names[: self.distinct], "round-robin"),
            "zipf": (names, "80/20"),
            "hot": (names, "hot"),
        }[self.adapters]
        if popularity == "hot":  # one adapter (names[0], the one hybrid serving merges), the rest spread
            chosen = [names[0] if rng.random() < HOT_SHARE else rng.choice(names[1:]) for _ in prompts]
            return list(zip(chosen, prompts))
        return list(zip(choose(pool, popularity, self.num_requests, rng), prompts))


def chat_prompts(model_dir: Path, lengths: list[int], rng: random.Random) -> list[list[int]]:
    """Chat-formatted prompts of exactly these token counts: the model's chat template around a user
    message cut from standard-library docstrings."""
    from transformers import AutoTokenizer

    from demo.builders import corpus

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    marker = "\x00"
    before, after = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    ).split(marker)
    head, tail = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (before, after))
    words = " ".join(corpus()).split()
    prompts = []
    for length in lengths:
        start = rng.randrange(len(words) - 400)
        body = tokenizer(" ".join(words[start : start + 400]), add_special_tokens=False)["input_ids"]
        prompts.append(head + body[: length - len(head) - len(tail)] + tail)
    return prompts


def workloads(quick: bool = False, real: bool = False) -> list[Workload]:
    n, c = (8, 8) if quick else (32, 32)
    new = 8 if quick else 64 if real else 32  # real: 64 tokens after chat prompts of 64-256
    prompt = 8 if quick else 32
    slow_n = 16 if quick else 64 if real else 128
    system = 64 if quick else 512
    return [
        Workload("base only", n, c, "base", prompt_len=prompt, new_tokens=new),
        Workload("1 adapter", n, c, "one", prompt_len=prompt, new_tokens=new),
        Workload(f"{n // 4} distinct", n, c, "distinct", n // 4, prompt_len=prompt, new_tokens=new),
        Workload(f"{n} distinct", n, c, "distinct", n, prompt_len=prompt, new_tokens=new),
        Workload("zipf 80/20", slow_n, c, "zipf", prompt_len=prompt, new_tokens=new),
        Workload("one hot 80%", slow_n, c, "hot", prompt_len=prompt, new_tokens=new),
        Workload(f"prefix {n // 4}x{system}", 2 * n, c, "prefix", n // 4, prompt, new, system_len=system),
    ]


def adapter_names(shape: Shape) -> list[str]:
    return [f"a{i:03d}" for i in range(shape.num_adapters)]


def build_assets(root: Path, shape: Shape) -> Path:
    """root/base (tokenizer + model) and root/adapters/<name>; kept and reused while the shape is the same."""
    root = Path(root)
    stamp = root / "built.json"
    recipe = {"shape": asdict(shape), "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(recipe)):
        return root
    if shape.base == "smollm2":
        from demo.smollm2 import convert

        base = convert(root / "base")
    else:
        sizes = {
            k: v for k, v in asdict(shape).items() if k not in ("rank", "alpha", "targets", "num_adapters", "base")
        }
        vocab = sizes.pop("vocab_size")
        base = build_model(root / "base", vocab_size=vocab, initializer_range=0.05, **sizes)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=shape.rank, lora_alpha=shape.alpha, target_modules=list(shape.targets), init_lora_weights=False)
    model = get_peft_model(model, lora)
    for i, name in enumerate(adapter_names(shape)):
        torch.manual_seed(1000 + i)  # as build_adapter: A and B get nn.Linear's own random init
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.lora_A["default"].reset_parameters()
                module.lora_B["default"].reset_parameters()
        model.save_pretrained(root / "adapters" / name)
    stamp.write_text(json.dumps(recipe))
    return root
