"""Session fixtures: small models, tokenizer and PEFT adapters built in a temporary folder, a PEFT
reference model on them, and a real tritonserver serving the model repository on them."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from client.api import generate
from client.server import TritonServer
from demo.builders import DEMO_ADAPTERS, build_adapter, build_model

ADAPTERS = DEMO_ADAPTERS  # ranks 4..64; targets as list, regex, all-linear; rsLoRA; rank/alpha_pattern
NEVER = -1  # an end_id no token has: a request runs its max_tokens
MIX = "qv-r4:0.7,attn-r8-rslora:-0.3"  # list targets both (PEFT's cat needs one kind), the first without rsLoRA


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """<root>/base (Llama + tokenizer) and <root>/adapters/<name>."""
    root = tmp_path_factory.mktemp("assets")
    build_model(root / "base", vocab_size=512)
    for i, (name, lora) in enumerate(ADAPTERS.items()):
        build_adapter(root / "base", root / "adapters" / name, seed=i + 1, **lora)
    return root


@pytest.fixture(scope="session")
def peft_model(assets):
    """PEFT's own model with every adapter loaded: the reference for outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets / "base", dtype=torch.float32)
    names = list(ADAPTERS)
    model = PeftModel.from_pretrained(base, assets / "adapters" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(assets / "adapters" / name, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="session")
def peft_mix(peft_model):
    """The PEFT model with MIX added as the adapter "mix", by add_weighted_adapter(combination_type="cat")."""
    peft_model.add_weighted_adapter(["qv-r4", "attn-r8-rslora"], [0.7, -0.3], "mix", combination_type="cat")
    return peft_model


@pytest.fixture(scope="session")
def vocab(peft_model) -> int:
    return peft_model.get_input_embeddings().num_embeddings


@pytest.fixture
def engines():
    """Engines a test starts; shut down at teardown whatever happened."""
    started = []
    yield started
    for e in started:
        e.shutdown(timeout=10)


def peft_generate(model, ids: list[int], adapter: str, max_tokens: int, end_id=None, **generate_kw) -> list[int]:
    """Greedy tokens from PEFT's generate(..., adapter_names=[...]) (the base model for adapter ""); end_id:
    an id or a list of them; generate_kw: more of generate's arguments (logits processors)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            adapter_names=[adapter or "__base__"],
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=0,
            **generate_kw,
        )
    return out[0, len(ids) :].tolist()


def generate_together(server: TritonServer, ps: list[list[int]], names: list[str | None], max_tokens: int) -> list:
    """One greedy request per (prompt, adapter) to lora_llm, all at once (they may share engine steps)."""

    def one(i: int):
        values = dict(input_ids=ps[i], lora_name=names[i], max_tokens=max_tokens, end_id=NEVER)
        return generate(server.grpc_url, "lora_llm", **values)

    with ThreadPoolExecutor(len(ps)) as pool:
        return list(pool.map(one, range(len(ps))))


@pytest.fixture(scope="session")
def server(assets, tmp_path_factory):
    """A real tritonserver on model_repository/, pointed at the test assets."""
    env = {ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters")}
    log = tmp_path_factory.mktemp("server") / "tritonserver.log"
    server = TritonServer(env=env, log_path=log).start()
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"tritonserver did not stop cleanly ({code}):\n{server.log_tail()}"
