"""backend/lora/adapters.py against PEFT itself: what PEFT's model holds after loading an adapter is what we load."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from backend.errors import RequestError
from backend.lora.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterStore, check_name, module_scale, select_targets
from backend.model.runner import ModelRunner
from demo.builders import DEMO_ADAPTERS, build_adapter, build_base

PREFIX = "base_model.model."


def make_store(base: Path, adapters: Path, max_rank: int = 64) -> AdapterStore:
    """As backend/engine/engine.py builds it: shapes and module names from a ModelRunner on the base."""
    runner = ModelRunner(
        base, dtype=torch.float32, device="cpu", max_seqs=1, max_len=32, num_slots=1, max_rank=max_rank
    )
    return AdapterStore(adapters, runner.shapes, runner.module_names, max_rank)


def peft_layers(model: PeftModel, adapter: str) -> dict[str, LoraLayer]:
    return {
        n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A
    }


def assert_matches_peft(store: AdapterStore, model: PeftModel, adapter: str) -> None:
    ours = store.load(adapter).modules
    theirs = peft_layers(model, adapter)
    assert set(ours) == set(theirs)
    for name, layer in theirs.items():
        m = ours[name]
        assert m.rank == layer.r[adapter], name
        assert m.scale == pytest.approx(layer.scaling[adapter], rel=1e-12), name
        torch.testing.assert_close(m.a, layer.lora_A[adapter].weight, rtol=0, atol=0)
        torch.testing.assert_close(m.b, layer.lora_B[adapter].weight, rtol=0, atol=0)


@pytest.fixture(scope="module")
def store(assets) -> AdapterStore:
    return make_store(assets / "base", assets / "adapters")


@pytest.mark.parametrize("adapter", list(DEMO_ADAPTERS))
def test_demo_adapter_matches_peft(store, peft_model, adapter):
    assert_matches_peft(store, peft_model, adapter)


@pytest.mark.parametrize(
    "lora",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
        dict(r=8, lora_alpha=8, target_modules="all-linear", exclude_modules=["k_proj", "up_proj"]),
        dict(r=8, lora_alpha=4, target_modules=["self_attn.o_proj", "model.layers.0.mlp.up_proj"]),
        dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={r"layers\.1\..*_proj": 2}, use_rslora=True),
    ],
    ids=["layers_to_transform", "exclude_modules", "dotted-names", "regex-rank_pattern"],
)
def test_peft_options_match_peft(assets, tmp_path, lora):
    build_adapter(assets / "base", tmp_path / "a", seed=7, **lora)
    base = AutoModelForCausalLM.from_pretrained(assets / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")
    assert_matches_peft(make_store(assets / "base", tmp_path), model, "a")


@pytest.mark.parametrize("targets", [["c_attn", "c_proj"], "all-linear"], ids=["c_attn,c_proj", "all-linear"])
def test_gpt2_conv1d_fan_in_fan_out(tmp_path, targets):
    base = build_base(tmp_path / "gpt2", arch="gpt2", vocab_size=128)
    build_adapter(base, tmp_path / "adapters" / "g", r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True)
    store = make_store(base, tmp_path / "adapters")
    adapter = store.load("g")
    # Conv1D weight is [d_in, d_out]: c_attn maps 64 -> 3 * 64
    assert adapter.modules["transformer.h.0.attn.c_attn"].a.shape == (4, 64)
    assert adapter.modules["transformer.h.0.attn.c_attn"].b.shape == (192, 4)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapters" / "g", adapter_name="g"
    )
    assert_matches_peft(store, model, "g")


@pytest.mark.parametrize(
    "cfg, module, rank, expected",
    [
        (dict(lora_alpha=16), "model.layers.0.self_attn.q_proj", 8, 2.0),
        (dict(lora_alpha=16, use_rslora=True), "model.layers.0.self_attn.q_proj", 8, 16 / math.sqrt(8)),
        (dict(lora_alpha=16, alpha_pattern={"o_proj": 4}), "model.layers.0.self_attn.o_proj", 8, 0.5),
        (dict(lora_alpha=16, alpha_pattern={"o_proj": 4}), "model.layers.0.self_attn.xo_proj", 8, 2.0),
        (
            dict(lora_alpha=16, alpha_pattern={r"layers\.1\.self_attn\.o_proj": 4}),
            "model.layers.1.self_attn.o_proj",
            2,
            2,
        ),
        (
            dict(lora_alpha=16, alpha_pattern={r"layers\.1\.self_attn\.o_proj": 4}),
            "model.layers.0.self_attn.o_proj",
            2,
            8,
        ),
        (dict(), "model.layers.0.mlp.up_proj", 4, 2.0),  # PEFT's default lora_alpha is 8
    ],
)
def test_module_scale(cfg, module, rank, expected):
    assert module_scale(cfg, module, rank) == pytest.approx(expected)
    patterns = cfg.get("alpha_pattern", {})
    alpha = patterns.get(get_pattern_key(patterns.keys(), module), cfg.get("lora_alpha", 8))
    assert module_scale(cfg, module, rank) == pytest.approx(
        alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
    )


def small_model(arch: str) -> nn.Module:
    sizes = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    if arch == "gpt2":
        sizes = dict(n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=64, **sizes))


@pytest.mark.parametrize(
    "arch, targets",
    [
        ("llama", ["q_proj", "v_proj"]),
        ("llama", ["self_attn.o_proj", "mlp.down_proj"]),
        ("llama", ["model.layers.0.self_attn.k_proj"]),
        ("llama", ["proj", "q_proj"]),  # a suffix matches whole dotted components only
        ("llama", r".*\.mlp\.(gate|up|down)_proj"),
        ("llama", r".*layers\.1\..*_proj"),
        ("llama", r"model\.layers\.0\.self_attn\.[qk]_proj"),
        ("llama", "all-linear"),
        ("gpt2", ["c_attn", "mlp.c_proj"]),
        ("gpt2", "all-linear"),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(v),
)
def test_select_targets_matches_peft(arch, targets):
    model = small_model(arch)
    out = model.get_output_embeddings()
    names = [n for n, _ in model.named_modules() if n]
    linear = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not out}
    chosen = select_targets(targets, names, linear)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
    assert chosen == set(peft_layers(peft, "default"))
    if targets == "all-linear":
        assert "lm_head" not in chosen


def copy_adapter(assets: Path, dst: Path, name: str = "qv-r4", **cfg) -> Path:
    shutil.copytree(assets / "adapters" / name, dst)
    path = dst / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **cfg}))
    return dst


def edit_tensors(folder: Path, edit) -> None:
    path = folder / WEIGHTS_FILE
    save_file(edit(load_file(path)), path)


def dora_without_use_dora(assets, dst):
    copy_adapter(assets, dst)
    edit_tensors(
        dst, lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}
    )


def dora_magnitude_shape(assets, dst):
    copy_adapter(assets, dst, use_dora=True)
    names = {k.removesuffix(".lora_A.weight") for k in load_file(dst / WEIGHTS_FILE) if k.endswith("lora_A.weight")}
    sizes = {n: 3 if n.endswith("layers.0.self_attn.q_proj") else 64 for n in names}
    edit_tensors(dst, lambda t: {**t, **{f"{n}.lora_magnitude_vector": torch.ones(s) for n, s in sizes.items()}})


def renamed_module(assets, dst):
    copy_adapter(assets, dst)
    edit_tensors(dst, lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()})


def other_arch(assets, dst):
    build_adapter(build_base(dst.parent / "gpt2", arch="gpt2", vocab_size=128), dst, r=4, target_modules=["c_attn"])


def other_hidden_size(assets, dst):
    base = build_base(dst.parent / "narrow", vocab_size=128, hidden_size=32, intermediate_size=64)
    build_adapter(base, dst, r=4, target_modules=["q_proj"])


def only_bin(assets, dst):
    copy_adapter(assets, dst)
    torch.save(load_file(dst / WEIGHTS_FILE), dst / "adapter_model.bin")
    (dst / WEIGHTS_FILE).unlink()


def stray_key(assets, dst):
    copy_adapter(assets, dst)
    edit_tensors(dst, lambda t: {**t, PREFIX + "model.norm.weight": torch.ones(64)})


def lora_a_only(assets, dst):
    copy_adapter(assets, dst)
    edit_tensors(dst, lambda t: {k: v for k, v in t.items() if "v_proj.lora_B" not in k})


def weights_linked_outside(assets, dst):
    copy_adapter(assets, dst)
    outside = dst.parent.parent / "elsewhere.safetensors"
    (dst / WEIGHTS_FILE).rename(outside)
    (dst / WEIGHTS_FILE).symlink_to(outside)


def folder_linked_outside(assets, dst):
    copy_adapter(assets, dst.parent.parent / "elsewhere")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(dst.parent.parent / "elsewhere")


def huge_weights(assets, dst):
    copy_adapter(assets, dst)
    with open(dst / WEIGHTS_FILE, "r+b") as f:
        f.truncate(2**34)  # sparse: 16 GiB on paper, refused before a byte is read


@pytest.mark.parametrize(
    "make, max_rank, message",
    [
        (renamed_module, 64, "missing in the base model"),
        (other_arch, 64, "matches no layer of the base model"),
        (other_hidden_size, 64, "shape mismatch"),
        (lambda a, d: copy_adapter(a, d, "mlp-r64"), 32, "max_lora_rank"),
        (lambda a, d: copy_adapter(a, d, use_dora=True), 64, "lacks lora_A, lora_B or its DoRA magnitude"),
        (dora_without_use_dora, 64, "is a DoRA magnitude, and adapter_config.json does not set use_dora"),
        (dora_magnitude_shape, 64, "DoRA magnitude at 'model.layers.0.self_attn.q_proj' has shape (3,)"),
        (
            lambda a, d: build_adapter(a / "base", d, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
            64,
            "modules_to_save",
        ),
        (only_bin, 64, "pickle"),
        (lambda a, d: copy_adapter(a, d, peft_type="IA3"), 64, "peft_type"),
        (stray_key, 64, "unsupported tensor"),
        (lora_a_only, 64, "lacks lora_A or lora_B"),
        (lambda a, d: copy_adapter(a, d, target_modules=["q_proj"]), 64, "target_modules does not select"),
        (lambda a, d: copy_adapter(a, d, r=100000), 64, "rank 100000, its tensors have rank 4"),
        (lambda a, d: copy_adapter(a, d, target_modules=["nonexistent_proj"]), 64, "matches no layer"),
        (weights_linked_outside, 64, "link out of the adapter's folder"),
        (folder_linked_outside, 64, "link out of the adapter's folder"),
        (huge_weights, 64, "bytes, above"),
    ],
    ids=[
        "renamed-module",
        "other-arch",
        "hidden-size",
        "rank",
        "dora-no-magnitude",
        "dora-magnitude-no-use_dora",
        "dora-magnitude-shape",
        "modules_to_save",
        "bin-only",
        "peft_type",
        "stray-key",
        "lora_A-only",
        "untargeted-weights",
        "config-rank-disagrees",
        "targets-match-nothing",
        "weights-symlink-escape",
        "folder-symlink-escape",
        "absurd-size",
    ],
)
def test_invalid_adapter(assets, tmp_path, make, max_rank, message):
    make(assets, tmp_path / "adapters" / "bad")
    with pytest.raises(RequestError) as e:
        make_store(assets / "base", tmp_path / "adapters", max_rank).load("bad")
    assert e.value.code == "INVALID_ARG"
    assert "'bad'" in e.value.message and message in e.value.message


def test_unknown_adapter(store):
    with pytest.raises(RequestError) as e:
        store.load("x")
    assert (e.value.code, e.value.message) == ("NOT_FOUND", "LoRA adapter 'x' not found")


BAD_NAMES = ["../x", "../adapters/qv-r4", "a/b", "/etc", ".hidden", "-x", "_x", "a b", "a\n", "é", "a" * 129]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_name(store, name):
    for call in (check_name, store.load):
        with pytest.raises(RequestError) as e:
            call(name)
        assert e.value.code == "INVALID_ARG"


@pytest.mark.parametrize("name", ["a", "A.b_c-1", "qv-r4", "9", "a" * 128])
def test_valid_name(name):
    check_name(name)


def test_symlinks_allowed_by_setting(assets, tmp_path):
    weights_linked_outside(assets, tmp_path / "adapters" / "linked")
    store = make_store(assets / "base", tmp_path / "adapters")
    store.allow_symlinks = True
    assert store.load("linked").modules


def test_host_copy_survives_the_file_changing(assets, tmp_path):
    """The host copy owns its memory: overwriting or shrinking the file in place afterwards changes
    nothing that was loaded (safetensors' load_file would map the file and follow it)."""
    folder = copy_adapter(assets, tmp_path / "adapters" / "a")
    store = make_store(assets / "base", tmp_path / "adapters")
    loaded = store.load("a")
    before = {k: (m.a.clone(), m.b.clone()) for k, m in loaded.modules.items()}
    path = folder / WEIGHTS_FILE
    size = path.stat().st_size
    with open(path, "r+b") as f:  # in place: the same inode, as `cp` over it or a crashed writer does
        f.write(b"\0" * size)
    with open(path, "r+b") as f:
        f.truncate(size // 3)
    for k, m in loaded.modules.items():
        assert torch.equal(m.a, before[k][0]) and torch.equal(m.b, before[k][1])
    with pytest.raises(RequestError) as e:
        store.load("a")
    assert e.value.code == "INVALID_ARG" and "'a'" in e.value.message
