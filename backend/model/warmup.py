"""Kernel warm-up at load: with the Triton backends, every kernel variant the configuration can pick is
compiled and run once before the model reports ready, not JIT-compiled on the engine thread under traffic.

Triton compiles one binary per set of constexpr values and per specialization of the other arguments
(1, multiples of 16). The kernels keep what the batch changes out of both, except the split of the work:
of K in lora_shrink (by the rows and segments of a batch), of the context in the paged decode (by the
batch and its longest block table). LoRA: each distinct set of slot weights runs the batches that pick
each split. Attention: two decode steps of one token through the model, with a block table of one block
and of a whole context, and one step of a two-token prompt (the paged prefill kernel, whose variant
depends on no size of the batch), reach every layer's variants with its own arguments (window, soft-cap,
sinks)."""

import logging
import time

import torch

from backend.model.input_batch import SeqWork
from backend.model.runner import ModelRunner

log = logging.getLogger("lora_engine")


def warm_up(runner: ModelRunner, max_rows: int, max_seqs: int) -> str:
    """Runs the kernels' variants; a line for the log ("" when no Triton backend is in use). max_rows: the
    most tokens in one step; max_seqs: the most sequences (rows of the output layer)."""
    start = time.perf_counter()
    lora = lora_variants(runner, max_rows, max_seqs)
    decode = decode_variants(runner)
    if not (lora or decode):
        return ""
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    took = time.perf_counter() - start
    line = f"kernel warm-up: {lora} LoRA and {decode} attention batches in {took:.1f} s"
    log.info(line)
    return line


def lora_variants(runner: ModelRunner, max_rows: int, max_seqs: int) -> int:
    """Batches run, over the distinct shapes of slot weights (a fused group's once)."""
    distinct = {}
    for layer in runner.lora.layers.values():
        w = layer.w
        key = (tuple(w.a.shape), tuple(w.b.shape), w.a.dtype, tuple(w.widths), layer.is_output)
        distinct.setdefault(key, (w, max_seqs if layer.is_output else max_rows))
    return sum(runner.lora.ops.warm_up(w, rows) for w, rows in distinct.values())


def decode_variants(runner: ModelRunner) -> int:
    """Decode steps run, and a prompt step. Their K/V go to block 0, which is free at load and zeroed again
    afterwards."""
    if not runner.paged_kernel:
        return 0
    widths = sorted({1, runner.kv.blocks_for(runner.max_len)})
    for width in widths:
        runner.forward(runner.make_step([SeqWork([0] * width, [0], 0, -1)]))
    runner.forward(runner.make_step([SeqWork([0], [0, 0], 0, -1)]))
    for cache in (*runner.kv.k, *runner.kv.v):
        cache[: runner.block_size].zero_()
    return len(widths) + 1
