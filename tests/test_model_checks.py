"""Bases the engine cannot serve yet are refused at load, naming what gives them away."""

import json
import shutil

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from backend.model.checks import UnsupportedModel, check_layers
from backend.model.runner import ModelRunner
from demo.builders import build_base

NOT_SERVED = r"quantized bases \(FP8, AWQ, GPTQ, bitsandbytes, compressed-tensors\) are not served yet"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("quant") / "base", vocab_size=128)


@pytest.mark.parametrize(
    "quant, method",
    [
        (dict(quant_method="fp8", activation_scheme="dynamic", weight_block_size=[128, 128]), "fp8"),
        (dict(quant_method="awq", bits=4, group_size=128, version="gemm", zero_point=True), "awq"),
        (dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True), "gptq"),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "bitsandbytes"),  # older configs name no method
        (dict(quant_method="compressed-tensors", format="float-quantized", config_groups={}), "compressed-tensors"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_quantization_config_is_refused_before_loading(base, tmp_path, quant, method):
    folder = shutil.copytree(base, tmp_path / "base")
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "quantization_config": quant}))
    expected = rf"LlamaForCausalLM: config.json has a quantization_config \(quant_method '{method}'\); {NOT_SERVED}"
    with pytest.raises(UnsupportedModel, match=expected):
        ModelRunner(folder, dtype=torch.float32, device="cpu", max_seqs=1, max_len=32, num_slots=1, max_rank=8)


class FP8Linear(nn.Linear):
    """Stands in for transformers' finegrained-FP8 layer: an nn.Linear with fp8 weights."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = nn.Parameter(linear.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)


class QuantLinear(nn.Module):
    """Stands in for GPTQ's layer: packed int32 weights, no nn.Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(linear.in_features // 8, linear.out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, linear.out_features))


def small_llama() -> nn.Module:
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=64, **sizes))


def test_quantized_layers_are_refused_by_type():
    model = small_llama()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[1].mlp
    attn.q_proj, attn.k_proj, mlp.up_proj = FP8Linear(attn.q_proj), FP8Linear(attn.k_proj), QuantLinear(mlp.up_proj)
    expected = (
        r"LlamaForCausalLM: model.layers.0.self_attn.q_proj \(FP8Linear\), model.layers.1.mlp.up_proj "
        rf"\(QuantLinear\) are quantized layers; {NOT_SERVED}: use an unquantized base"
    )
    with pytest.raises(UnsupportedModel, match=expected):
        check_layers(model, "LlamaForCausalLM")


def test_a_linear_with_integer_weights_is_refused():
    model = small_llama()
    proj = model.model.layers[1].self_attn.o_proj
    proj.weight = nn.Parameter(torch.zeros_like(proj.weight, dtype=torch.int8), requires_grad=False)
    expected = rf"model.layers.1.self_attn.o_proj \(Linear, weight torch.int8\) is a quantized layer; {NOT_SERVED}"
    with pytest.raises(UnsupportedModel, match=expected):
        check_layers(model, "LlamaForCausalLM")
    check_layers(small_llama().to(torch.bfloat16), "LlamaForCausalLM")  # float weights of any width pass
