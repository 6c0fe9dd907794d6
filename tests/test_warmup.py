"""Kernel warm-up at load: with the Triton backends (here under Triton's interpreter) the engine launches
every kernel variant its configuration can pick before it serves, and later traffic launches none that
the warm-up did not. A variant is what Triton's JIT compiles one binary for: each constexpr's value and
each other argument's type and specialization (the value 1, multiples of 16), read at every launch."""

import inspect
import os
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

from backend.lora.ops import variant_batches  # noqa: E402
from demo.builders import build_adapter  # noqa: E402
from kernels import dora_scale, lora_expand, lora_shrink, paged_attention, paged_prefill  # noqa: E402
from tests.conftest import peft_generate  # noqa: E402
from tests.test_engine import drive, make_engine, prompts, request, submit_all, warm_and_drive  # noqa: E402

KERNELS = {
    "shrink": lora_shrink._lora_shrink_kernel,
    "expand": lora_expand._lora_expand_kernel,
    "decode": paged_attention._paged_decode_kernel,
    "reduce": paged_attention._paged_reduce_kernel,
    "dora": dora_scale._dora_scale_kernel,
    "prefill": paged_prefill._paged_prefill_kernel,
}


def variant(kernel, args: tuple, kwargs: dict) -> tuple:
    """The key Triton's JIT gives this launch (runtime/jit.py create_function_from_signature)."""
    params = inspect.signature(kernel.fn).parameters
    fixed = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    bound = dict(zip(params, args)) | kwargs
    key = []
    for name, param in params.items():
        value = bound[name]
        if "constexpr" in str(param.annotation):
            key.append((name, value))
        else:
            key.append((name, native_specialize_impl(BaseBackend, value, False, name not in fixed, True)))
    return tuple(key)


@pytest.fixture
def launches():
    """(kernel, variant) of every launch while the test runs."""
    seen: list[tuple[str, tuple]] = []
    hooks = {}
    for name, kernel in KERNELS.items():
        hooks[name] = lambda *a, _n=name, _k=kernel, **kw: seen.append((_n, variant(_k, a, kw)))
        kernel.add_pre_run_hook(hooks[name])
    yield seen
    for name, kernel in KERNELS.items():
        kernel.pre_run_hooks.remove(hooks[name])


def test_traffic_launches_no_variant_the_warm_up_did_not(assets, peft_model, vocab, launches):
    """Both backends on Triton: loading launches shrink, expand and the paged decode, then leaves no rank
    in a slot and nothing in the cache; a mixed batch (three adapters of ranks 4 to 64 beside the base
    model, prompts of 3 to 17 tokens, then decoding) launches only variants seen at load, and its outputs
    are PEFT's."""
    # max_lora_rank 72, not a multiple of 16: stride products with the batch's rows would vary in alignment
    kw = dict(lora_backend="triton", attention_backend="triton", max_num_seqs=6, max_lora_rank=72)
    engine = make_engine(assets / "base", assets / "adapters", **kw)
    assert engine.warmup.startswith("kernel warm-up: ")
    at_load = set(launches)
    assert {name for name, _ in at_load} >= {"shrink", "expand", "decode", "prefill"}
    assert all(rank == 0 for layer in engine.runner.lora.layers.values() for ranks in layer.w.ranks for rank in ranks)
    assert all(int(cache.count_nonzero()) == 0 for cache in (*engine.kv.k, *engine.kv.v))

    launches.clear()
    names = ["qv-r4", "", "mlp-r64", "all-r16-pattern"]
    ps = prompts(vocab, [3, 9, 17, 5], seed=47)
    outs = warm_and_drive(engine, ps, names, 2)
    for p, name, c in zip(ps, names, outs):
        assert c.final.error is None and c.token_ids == peft_generate(peft_model, p, name, 2)
    in_traffic = set(launches)
    assert {name for name, _ in in_traffic} >= {"shrink", "expand", "decode", "prefill"}
    assert in_traffic <= at_load, sorted(in_traffic - at_load)
    engine.shutdown()


def test_dora_traffic_launches_no_variant_the_warm_up_did_not(assets, vocab, launches, tmp_path):
    """DoRA's scale runs one variant per layer width: loading launches each, a DoRA request no other."""
    build_adapter(assets / "base", tmp_path / "dora", seed=9, r=4, target_modules="all-linear", use_dora=True)
    engine = make_engine(assets / "base", tmp_path, lora_backend="triton")
    at_load = {v for name, v in launches if name == "dora"}
    launches.clear()
    outs = submit_all(engine, [request(prompts(vocab, [5])[0], "dora", 2)])
    drive(engine, outs)
    in_traffic = {v for name, v in launches if name == "dora"}
    assert outs[0].final.error is None and in_traffic and in_traffic <= at_load
    engine.shutdown()


def test_torch_backends_warm_nothing(assets):
    engine = make_engine(assets / "base", assets / "adapters", lora_backend="torch", attention_backend="torch")
    assert engine.warmup == ""
    engine.shutdown()


def test_every_split_of_k_a_gpu_can_pick_is_warmed():
    """On a GPU the shrink launcher splits K for small batches and not for large ones (128 blocks of 16
    rows): the warm-up's batches reach both where the configuration allows a batch that large."""
    config = partial(lora_shrink.shrink_config, max_rank=64, d_in=4096, dtype=torch.float16, interpreter=False)

    def picked(max_rows: int) -> set[int]:
        batches = variant_batches(lambda rows, segments: config(rows, num_segments=segments), max_rows, 8)
        return {config(rows, num_segments=segments)["SPLIT_K"] for rows, segments in batches}

    assert picked(2048 + 32) == {1, 8}
    assert picked(64) == {8}  # 64 rows in 8 segments: 8 blocks
    assert picked(1) == {8}
    small_d_in = partial(lora_shrink.shrink_config, max_rank=64, d_in=32, dtype=torch.float16, interpreter=False)
    assert len(variant_batches(lambda r, s: small_d_in(r, num_segments=s), 2080, 8)) == 1  # never split


def test_the_decode_split_depends_on_the_longest_context_only_through_its_class():
    """The paged decode's variant depends on the batch only through SPLIT (one part or several): the
    warm-up's two decode steps, with a table of one block and of a whole context, reach both."""
    one = paged_attention.decode_config(1, 8, 4, 128, 16, torch.float16)
    whole = paged_attention.decode_config(1, 8, 4, 128, 32768, torch.float16)
    assert one["NUM_SPLITS"] == 1 and whole["NUM_SPLITS"] > 1
    assert {k: v for k, v in one.items() if k != "NUM_SPLITS"} == {k: v for k, v in whole.items() if k != "NUM_SPLITS"}
