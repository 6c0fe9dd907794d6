"""Trains the demo's LoRA adapters on the real base model with PEFT, one trait each, on the synthetic
data of demo/data.py, and writes them to demo/adapters/ (committed: bf16, a few MB in all).

    python -m demo.train_adapters [--base .demo/base] [--out demo/adapters] [--only pirate]

Deterministic on a given machine (fixed seeds, fixed data order); about 2-3 minutes an adapter on 2 cores.
"""

import argparse
import json
import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.config import DEMO_DIR
from backend.naming import CONFIG_FILE, WEIGHTS_FILE
from demo.data import HELD_OUT, TRAITS, examples

ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# name -> LoraConfig keywords: different ranks and targets, one with rsLoRA
ADAPTERS = {
    "pirate": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
    "json": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "bullets": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "terse": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
}
EPOCHS = {"terse": 4}  # 8 by default; terse answers learnt for longer lose their facts ("Germany." for a capital)


def chat_prompt(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """-> (ids, labels): the loss is on the answer and its end-of-turn token only."""
    prompt = chat_prompt(tokenizer, question)
    reply = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + reply, [-100] * len(prompt) + reply


def batches(encoded: list, size: int, epochs: int, pad_id: int, seed: int):
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), size):
            group = [encoded[i] for i in order[start : start + size]]
            width = max(len(ids) for ids, _ in group)
            ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in group])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in group])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in group])
            yield ids, labels, mask


def train(base_dir: Path, name: str, out_dir: Path, epochs: int, batch: int = 8, lr: float = 2e-3) -> Path:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **ADAPTERS[name]))
    encoded = [encode(tokenizer, q, a) for q, a in examples(name)]
    steps = epochs * -(-len(encoded) // batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    model.train()
    bar = tqdm(batches(encoded, batch, epochs, tokenizer.pad_token_id, seed=0), total=steps, desc=name)
    for ids, labels, mask in bar:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(out_dir / name)
    return tidy(out_dir / name)


def tidy(folder: Path) -> Path:
    """bf16 weights (half the bytes), the base named by its hub id rather than a local path, no model card."""
    weights = folder / WEIGHTS_FILE
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["base_model_name_or_path"] = BASE_ID
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)
    return folder


@torch.inference_mode()
def show(base_dir: Path, adapter_dir: Path, name: str, max_new_tokens: int = 48) -> int:
    """Greedy answers to the held-out questions; -> how many show the adapter's trait."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir / name).eval()
    shown = 0
    for question in HELD_OUT:
        prompt = torch.tensor([chat_prompt(tokenizer, question)])
        out = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
        shown += TRAITS[name](text)
        print(f"  [{name}] {question!r} -> {text!r}")
    return shown


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=DEMO_DIR / "base")
    p.add_argument("--out", type=Path, default=ADAPTERS_DIR)
    p.add_argument("--only", nargs="*", default=list(ADAPTERS))
    p.add_argument("--epochs", type=int, help="default: 8 (EPOCHS for some)")
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in a.only:
        train(a.base, name, a.out, epochs=a.epochs or EPOCHS.get(name, 8), lr=a.lr)
        print(f"{name}: {show(a.base, a.out, name)}/{len(HELD_OUT)} held-out answers show the trait")


if __name__ == "__main__":
    main()
