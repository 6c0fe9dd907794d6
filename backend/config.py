"""Engine settings: one frozen dataclass filled from config.pbtxt parameters, each overridable by an
environment variable LORA_<NAME> (LORA_MAX_MODEL_LEN, LORA_KV_CACHE_MEMORY, ...) so that a deployment
need not edit the repository. Imports no torch: the tokenizer models use it too."""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / ".demo"  # the real demo: demo/build.py
RANDOM_DEMO_DIR = DEMO_DIR / "random"  # the tiny random one: demo/builders.py
ENV_PREFIX = "LORA_"
ENV_BASE_MODEL = "LORA_BASE_MODEL"
ENV_ADAPTER_DIR = "LORA_ADAPTER_DIR"


@dataclass(frozen=True)
class EngineConfig:
    base_model: Path = DEMO_DIR / "base"  # HF model folder (weights, config, tokenizer)
    adapter_dir: Path = DEMO_DIR / "adapters"  # one PEFT adapter folder per adapter name
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # auto = the model's dtype on cuda, float32 on cpu
    max_loras: int = 8  # adapter slots: distinct adapters in one batch
    max_lora_rank: int = 64
    # host tier: adapters read from disk, in bytes ("4GiB", "512MB"); least recently used evicted first
    host_lora_memory: str = "4GiB"
    pinned_loras: str = ""  # adapters (name,name) loaded at start and never evicted from slot or host
    merged_loras: str = ""  # an adapter merged into the served weights at load (hybrid serving; float32 only)
    lora_backend: str = "auto"  # auto = triton on cuda, torch on cpu; triton on cpu runs Triton's interpreter
    attention_backend: str = "auto"  # decode attention: auto = triton (paged kernel) on cuda, torch on cpu
    lora_target_modules: str = "all-linear"  # layers that can take a LoRA: all-linear, a regex or name,name
    max_num_seqs: int = 32  # sequences in the running batch
    num_threads: int = 0  # torch (OpenMP) threads of the engine; 0 = the cores this process may use
    max_model_len: int = 0  # context length; 0 = the model's
    max_prefill_tokens: int = 2048  # prompt tokens fed per step; longer prompts are fed in chunks
    # KV cache: bytes ("4GiB", "512MB", "1e9") or a fraction of free memory ("0.9"); "auto" = 0.9 of the
    # GPU's free memory after weights and adapter slots, 1GiB on a CPU. Never more than max_num_seqs
    # sequences of max_model_len need.
    kv_cache_memory: str = "auto"
    kv_block_size: int = 16  # tokens per KV-cache block
    cuda_graphs: bool = False  # decode steps replayed from CUDA graphs (triton backends, lean forward)
    lean_forward: bool = True  # Llama, Mistral, Qwen2: our forward over the model's modules; false: transformers'
    enable_prefix_caching: bool = True  # full blocks of K/V shared by prompts that start alike (same adapter)
    max_queued_requests: int = 256  # requests waiting to run; past it a request gets UNAVAILABLE
    shutdown_grace_seconds: float = 5.0  # at server shutdown, requests still running then get UNAVAILABLE
    allow_adapter_symlinks: bool = False  # follow symlinks that lead out of an adapter's folder
    default_max_tokens: int = 64
    max_tokens_limit: int = 1024

    @classmethod
    def from_parameters(cls, params: dict[str, str], root: Path = REPO_ROOT, env=os.environ) -> "EngineConfig":
        """params: config.pbtxt `parameters` as name -> string; relative paths are resolved from `root`.
        A non-empty environment variable LORA_<NAME> wins over the parameter <name>."""
        values = {}
        for f in dataclasses.fields(cls):
            var = ENV_PREFIX + f.name.upper()
            raw, source = (env[var], var) if env.get(var, "").strip() else (params.get(f.name, ""), f.name)
            if raw.strip():
                try:
                    values[f.name] = parse_value(f.type, raw.strip(), Path.cwd() if source == var else root)
                except ValueError as e:
                    raise ValueError(f"setting {source}: {e}") from None
        return cls(**values)

    def as_parameters(self) -> dict[str, str]:
        """The settings in effect, as config.pbtxt parameter strings (absolute paths)."""
        return {f.name: format_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def pinned(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.strip() for s in self.pinned_loras.split(",") if s.strip()))

    @property
    def merged(self) -> str:
        names = [s.strip() for s in self.merged_loras.split(",") if s.strip()]
        if len(names) > 1:
            raise ValueError(f"merged_loras names {len(names)} adapters; one for now")
        return names[0] if names else ""

    @property
    def targets(self) -> str | list[str]:
        t = self.lora_target_modules.strip()
        if t == "all-linear" or any(c in t for c in "*+?[](){}|\\^$"):
            return t
        return [s.strip() for s in t.split(",") if s.strip()]


def instance_device(setting: str, args: dict[str, str]) -> tuple[str, str]:
    """(device, why) for the model instance Triton initializes with `args` (model_instance_kind "GPU",
    "CPU" or "MODEL"; model_instance_device_id). A KIND_GPU instance runs on its own GPU when the device
    setting is auto or cuda: one instance per GPU, one engine per GPU. Other kinds keep the setting (auto:
    cuda if there is one, else the CPU); an explicit device (cuda:1, cpu) wins over the instance's GPU."""
    if args.get("model_instance_kind") != "GPU":
        return setting, ""
    own = f"cuda:{int(args.get('model_instance_device_id') or 0)}"
    device = own if setting in ("auto", "cuda") else setting
    if device == own:
        return device, f"device {device}: this KIND_GPU instance's GPU"
    return device, f"device {device} as set, not this KIND_GPU instance's GPU ({own})"


def context_length(model_config: dict, max_model_len: int = 0) -> int:
    """The model's context in tokens (a config.json's values), capped at max_model_len when that is
    set; 0 if neither says."""
    length = model_config.get("max_position_embeddings") or model_config.get("n_positions") or 0
    length = int(length * dynamic_rope_factor(model_config))
    return min(length, max_model_len) if length and max_model_len else (length or max_model_len)


def dynamic_rope_factor(model_config: dict) -> float:
    """Dynamic NTK RoPE only rescales past max_position_embeddings: its context is that times `factor`, as vLLM
    derives it. (A fixed NTK `alpha`, as HunYuan's configs give, is not dynamic.)"""
    rope = model_config.get("rope_parameters") or model_config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type"))
    return float(rope.get("factor") or 1.0) if kind == "dynamic" and not rope.get("alpha") else 1.0


def parse_value(kind: type, raw: str, root: Path):
    if kind is Path:
        return (root / raw).resolve()
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    return kind(raw)


def format_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
