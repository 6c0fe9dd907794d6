"""Replayable decode steps (setting cuda_graphs; backend/model/cuda_graphs.py). Without a GPU nothing is captured,
but every decode step is padded to its bucket and built `fixed` (segments over every slot, grids over every token,
full-width block tables, every LoRA launch run), and runs eagerly: outputs must be PEFT's all the same. The capture
and replay themselves are checked by scripts/gpu_check.sh on a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

from backend.model import cuda_graphs  # noqa: E402
from demo.builders import build_adapter  # noqa: E402
from tests.conftest import peft_generate  # noqa: E402
from tests.test_engine import drive, make_engine, prompts, request, submit_all, warm_and_drive  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = dict(lora_backend="triton", attention_backend="triton", cuda_graphs=True, max_num_seqs=6, device=DEVICE)


def test_buckets_cover_every_batch_size():
    assert cuda_graphs.buckets(6) == [1, 2, 4, 6]
    assert cuda_graphs.buckets(32) == [1, 2, 4, 8, 16, 32]


def test_padded_decode_steps_equal_peft(assets, peft_model, vocab, monkeypatch):
    """Three adapters and the base model decoding together (3 then 4 sequences: buckets 4; padding rows beside
    them), after prompt steps that run as they are."""
    engine = make_engine(assets / "base", assets / "adapters", **TRITON)
    built = []
    build = engine.runner.batch.build
    monkeypatch.setattr(
        engine.runner.batch, "build", lambda work, fixed=False: built.append((len(work), fixed)) or build(work, fixed)
    )
    names = ["qv-r4", "", "mlp-r64", "all-r16-pattern"]
    ps = prompts(vocab, [3, 9, 17, 5], seed=5)
    outs = warm_and_drive(engine, ps, names, 4)
    for p, name, c in zip(ps, names, outs):
        assert c.final.error is None and c.token_ids == peft_generate(peft_model, p, name, 4)
    assert (4, True) in built and all(n in cuda_graphs.buckets(6) for n, fixed in built if fixed)
    assert sorted(engine.runner.graphs.graphs) == (cuda_graphs.buckets(6) if DEVICE == "cuda" else [])
    assert any(not fixed for _, fixed in built)  # the prompt steps
    engine.shutdown()


def test_padded_steps_serve_dora(assets, vocab, tmp_path):
    """DoRA's scale is launched on every replayed step (its g = 1 and c = 0 made at load)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    build_adapter(assets / "base", tmp_path / "dora", seed=9, r=4, target_modules="all-linear", use_dora=True)
    engine = make_engine(assets / "base", tmp_path, **TRITON)
    p = prompts(vocab, [6])[0]
    outs = submit_all(engine, [request(p, "dora", 3), request(p, "", 3)])
    drive(engine, outs)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "base"), tmp_path / "dora")
    with torch.no_grad():  # PEFT refuses adapter_names with DoRA: its one adapter is active
        ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert outs[0].final.error is None and outs[0].token_ids == ref[0, len(p) :].tolist()
    engine.shutdown()


def test_cuda_graphs_refuses_what_it_cannot_replay(assets):
    with pytest.raises(ValueError, match="cuda_graphs needs lora_backend and attention_backend triton"):
        make_engine(assets / "base", assets / "adapters", cuda_graphs=True)
