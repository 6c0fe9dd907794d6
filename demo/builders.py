"""Builds the demo (and test) assets locally, with no network: a byte-level BPE tokenizer trained on
text every Python install has, a small random base model, and PEFT LoRA adapters made by PEFT.

    python -m demo.builders [out_dir]     # default: .demo/random/ in the repository

The real demo (SmolLM2 and trained adapters) is demo/build.py.
"""

import codecs
import contextlib
import importlib
import inspect
import io
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from backend.config import RANDOM_DEMO_DIR

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
CORPUS_MODULES = [
    "this",
    "textwrap",
    "json",
    "collections",
    "functools",
    "itertools",
    "pathlib",
    "argparse",
    "logging",
    "dataclasses",
    "unittest",
    "string",
    "re",
    "os",
    "shutil",
    "csv",
    "random",
]

# name -> LoraConfig keywords: different ranks, targets as list / regex / all-linear, rsLoRA, rank_pattern
DEMO_ADAPTERS = {
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "attn-r8-rslora": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True
    ),
    "all-r16-pattern": dict(
        r=16, lora_alpha=32, target_modules="all-linear", rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 8}
    ),
    "mlp-r64": dict(r=64, lora_alpha=64, target_modules=r".*\.mlp\.(gate|up|down)_proj"),
}


def corpus() -> list[str]:
    """Docstrings of standard-library modules (and the Zen of Python): on every machine with Python."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        texts = [codecs.decode(importlib.import_module("this").s, "rot13")]
    for name in CORPUS_MODULES[1:]:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, attr)) if not attr.startswith("_") else None
            if doc:
                texts.append(doc)
    return [t for t in texts if t]


def build_tokenizer(out_dir: Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_base(out_dir: Path, arch: str = "llama", vocab_size: int = 1024, seed: int = 0, **config) -> Path:
    """A random causal LM of the given architecture (llama, mistral, qwen2, phi3, gemma2, gpt2), saved as
    safetensors; `config` overrides the small sizes and anything else of the architecture's config."""
    torch.manual_seed(seed)
    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    if arch == "gpt2":
        sizes = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2, tie_word_embeddings=False)
    ids = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = AutoConfig.for_model(arch, **ids, **{**sizes, **config})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out_dir)
    return Path(out_dir)


def build_adapter(base_dir: Path, out_dir: Path, seed: int = 0, **lora) -> Path:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False), saved by PEFT itself. DoRA
    (use_dora=True): magnitudes scaled by 0.5..1.5 at random, since PEFT starts them at ‖W + s·B·A‖ (g = 1,
    which would serve the same as plain LoRA)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand_like(p))
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)  # lm_head as a target: its LoRA only
    return Path(out_dir)


FARM_TARGETS = [
    "all-linear",
    ["q_proj", "v_proj"],
    ["q_proj", "k_proj", "v_proj", "o_proj"],
    ["gate_proj", "up_proj", "down_proj"],
    ["o_proj", "down_proj"],
]


def build_adapter_farm(base_dir: Path, out_dir: Path, count: int, seed: int = 0, max_rank: int = 64) -> list[str]:
    """`count` adapters of mixed ranks (1..max_rank, log-uniform) and targets, written as PEFT writes them
    (adapter_config.json + adapter_model.safetensors) without building a PEFT model each: thousands
    take seconds. Returns their names."""
    from safetensors.torch import save_file

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    linear = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    gen = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        rank = max(1, min(max_rank, round(2 ** (torch.rand(1, generator=gen).item() * 6.0))))
        targets = FARM_TARGETS[i % len(FARM_TARGETS)]
        chosen = [n for n in linear if targets == "all-linear" or n.rsplit(".", 1)[-1] in targets]
        tensors = {}
        for module in chosen:
            d_out, d_in = linear[module].weight.shape
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.3
        name = f"farm-{i:04d}"
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / "adapter_model.safetensors")
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base_dir),
            "r": rank,
            "lora_alpha": 2 * rank if i % 2 else 16,
            "use_rslora": i % 3 == 0,
            "target_modules": targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        names.append(name)
    return names


def build_model(out_dir: Path, vocab_size: int = 1024, **config) -> Path:
    """Tokenizer + random base model (build_base's arch, seed and config) in one folder."""
    tokenizer = build_tokenizer(out_dir, vocab_size)
    return build_base(out_dir, vocab_size=len(tokenizer), **config)


def build_random_demo(out_dir: Path = RANDOM_DEMO_DIR) -> Path:
    """Tokenizer + base model in out_dir/base, adapters in out_dir/adapters/<name>. Skips if present."""
    out_dir = Path(out_dir)
    stamp = out_dir / "built.json"
    recipe = {"adapters": DEMO_ADAPTERS, "version": 2}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(recipe)):
        return out_dir
    base = build_model(
        out_dir / "base",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        max_position_embeddings=2048,  # GenAI-Perf's default prompts (~550 tokens) and answers fit
    )
    for i, (name, lora) in enumerate(DEMO_ADAPTERS.items()):
        build_adapter(base, out_dir / "adapters" / name, seed=i + 1, **lora)
    stamp.write_text(json.dumps(recipe))
    return out_dir


if __name__ == "__main__":
    print(build_random_demo(Path(sys.argv[1]) if len(sys.argv) > 1 else RANDOM_DEMO_DIR))
