"""The OpenAI server's settings: one frozen dataclass, from the command line or LORA_* / OPENAI_* variables."""

import os
from dataclasses import dataclass
from pathlib import Path

from backend.config import DEMO_DIR, ENV_ADAPTER_DIR, ENV_BASE_MODEL


@dataclass(frozen=True)
class Settings:
    triton_url: str = "localhost:8001"  # tritonserver's gRPC endpoint
    model_dir: Path = DEMO_DIR / "base"  # the base model folder: its tokenizer and chat template are read here
    adapter_dir: Path = DEMO_DIR / "adapters"  # listed by /v1/models
    served_model_name: str = ""  # the base model's name in `model`; "" = the folder's name
    list_adapters: bool = True  # false: /v1/models shows the base model only
    engine_model: str = "lora_llm"  # the Triton model that generates
    host: str = "0.0.0.0"
    port: int = 9000

    @property
    def base_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).name

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        """Defaults for the command line: the same variables as tritonserver's models."""
        values = {}
        if env.get(ENV_BASE_MODEL):
            values["model_dir"] = Path(env[ENV_BASE_MODEL]).resolve()
        if env.get(ENV_ADAPTER_DIR):
            values["adapter_dir"] = Path(env[ENV_ADAPTER_DIR]).resolve()
        if env.get("OPENAI_PORT"):
            values["port"] = int(env["OPENAI_PORT"])
        if env.get("GRPC_PORT"):
            values["triton_url"] = f"localhost:{env['GRPC_PORT']}"
        return cls(**values)
