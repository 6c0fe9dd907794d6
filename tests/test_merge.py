"""Merged export (python -m backend.merge): the merged weights equal PEFT's merge_and_unload() in float32 for
every adapter form we serve, and the real server serves the result as its base, with PEFT's greedy outputs."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from backend.merge import INFO_FILE, main
from client.api import generate
from client.server import TritonServer
from demo.builders import build_adapter, build_base
from tests.conftest import ADAPTERS, NEVER
from tests.test_engine import prompts


def peft_merged(base, adapter) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def assert_weights_equal_peft(base, adapter, out) -> None:
    assert main(["--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    ours = load_file(out / "model.safetensors")
    theirs = peft_merged(base, adapter).state_dict()
    before = load_file(base / "model.safetensors")
    assert set(ours) <= set(theirs)
    changed = 0
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, before[key])
    assert changed > 0


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_merged_weights_equal_peft_merge_and_unload(assets, tmp_path, name):
    """rank 4..64, list / regex / all-linear targets, rsLoRA, rank and alpha patterns."""
    assert_weights_equal_peft(assets / "base", assets / "adapters" / name, tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == (assets / "base" / "tokenizer.json").read_bytes()
    info = json.loads((tmp_path / "merged" / INFO_FILE).read_text())
    assert info["dtype"] == "float32" and len(info["adapter_version"]) == 16


@pytest.mark.parametrize(
    "arch, targets",
    [("gpt2", ["c_attn", "c_proj"]), ("phi3", ["qkv_proj", "gate_up_proj", "o_proj"])],
    ids=["gpt2-conv1d", "phi3-fused"],
)
def test_merged_conv1d_and_fused_layers_equal_peft(tmp_path, arch, targets):
    base = build_base(tmp_path / arch, arch=arch, vocab_size=128)
    lora = dict(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    adapter = build_adapter(base, tmp_path / "adapters" / "a", seed=3, **lora)
    assert_weights_equal_peft(base, adapter, tmp_path / "merged")


@pytest.mark.parametrize(
    "arch, targets",
    [("llama", ["q_proj", "v_proj", "down_proj", "lm_head"]), ("gpt2", ["c_attn", "c_proj"]), ("qwen2", "all-linear")],
    ids=["llama-lm_head", "gpt2-conv1d", "qwen2-bias"],
)
def test_merged_dora_equals_peft(tmp_path, arch, targets):
    """W' = g ⊙ (W + s·B·A) by output row, g = m / ‖W + s·B·A‖, as PEFT's merge_and_unload()."""
    base = build_base(tmp_path / arch, arch=arch, vocab_size=128)
    lora = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True, fan_in_fan_out=arch == "gpt2")
    adapter = build_adapter(base, tmp_path / "adapters" / "a", seed=5, **lora)
    assert_weights_equal_peft(base, adapter, tmp_path / "merged")


def test_what_the_server_refuses_the_merge_refuses(assets, tmp_path, capsys):
    saves = build_adapter(
        assets / "base", tmp_path / "adapters" / "saves", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    assert main(["--base", str(assets / "base"), "--adapter", str(saves), "--out", str(tmp_path / "m")]) == 2
    assert "LoRA adapter 'saves': modules_to_save is not supported" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    qv = str(assets / "adapters" / "qv-r4")
    assert main(["--base", str(assets / "base"), "--adapter", qv, "--out", str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_the_server_serves_the_merged_model_as_its_base(assets, tmp_path):
    name = "all-r16-pattern"
    out = tmp_path / "merged"
    assert main(["--base", str(assets / "base"), "--adapter", str(assets / "adapters" / name), "--out", str(out)]) == 0
    reference = peft_merged(assets / "base", assets / "adapters" / name)
    ps = prompts(512, [3, 9, 17], seed=21)
    env = {ENV_BASE_MODEL: str(out), ENV_ADAPTER_DIR: str(assets / "adapters")}
    with TritonServer(env=env, models=["lora_llm"]) as server:
        for p in ps:
            got = generate(server.grpc_url, "lora_llm", input_ids=p, max_tokens=8, end_id=NEVER).token_ids
            with torch.no_grad():
                want = reference.generate(
                    input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
                )[0, len(p) :].tolist()
            assert got == want
