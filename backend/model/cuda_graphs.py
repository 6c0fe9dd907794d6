"""Decode steps replayed from CUDA graphs (setting cuda_graphs, off by default).

A decode step of B sequences is padded to the next bucket (1, 2, 4, ..., max_num_seqs) and built `fixed`
(backend.model.input_batch): its tensors, grids and launches then depend on the bucket alone. One graph per
bucket is captured at load; a step fills the input buffers and replays it. What a replay reads lies at fixed
addresses: the input buffers, the KV cache, the slot weights (DoRA's scales made up front). Padding rows are
token 0 at position 0, in no slot, writing its K/V to a block no sequence is given.

On a CPU nothing is captured: the padded steps run eagerly, which is how the tests check them. A GPU check
is in scripts/gpu_check.sh."""

import logging

import torch

from backend.model.input_batch import SeqWork, StepBatch

log = logging.getLogger("lora_engine")


def buckets(max_seqs: int) -> list[int]:
    return sorted({*(2**i for i in range(max_seqs.bit_length()) if 2**i <= max_seqs), max_seqs})


def refusal(runner) -> str:
    """Why the runner's steps cannot be replayed ("" when they can)."""
    if runner.lora.ops.backend != "triton" or not runner.paged_kernel:
        return "cuda_graphs needs lora_backend and attention_backend triton"
    if runner.lean is None:
        return f"cuda_graphs needs the lean forward (lean_forward true; Llama, Mistral, Qwen2), not {runner.arch}"
    if runner.rope:
        return "cuda_graphs: this model's rope type takes its frequencies from the batch (dynamic, longrope)"
    return ""


class DecodeGraphs:
    def __init__(self, runner, forward, scratch_block: int, max_seqs: int):
        self.runner, self.forward, self.max_seqs = runner, forward, max_seqs
        self.buckets = buckets(max_seqs)
        self.pad = SeqWork([scratch_block], [0], 0, -1)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, work: list[SeqWork]) -> int:
        """The bucket a step is padded to; 0 for a step that is not all decode (it runs eagerly)."""
        if len(work) > self.max_seqs or not all(len(w.tokens) == 1 and w.sample for w in work):
            return 0
        return next(b for b in self.buckets if b >= len(work))

    def padded(self, work: list[SeqWork], bucket: int) -> list[SeqWork]:
        return work + [self.pad] * (bucket - len(work))

    def capture(self) -> None:
        """One graph per bucket, largest first (smaller ones reuse its memory pool); each after two eager runs
        on a side stream, which compile what is left to compile."""
        if self.runner.device.type != "cuda":
            log.info("cuda_graphs: no GPU; decode steps are padded to %s and run eagerly", self.buckets)
            return
        pool = None
        for b in reversed(self.buckets):
            step = self.runner.batch.build(self.padded([], b), fixed=True)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.forward(step)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(step)
            pool = graph.pool()
            self.graphs[b] = (graph, out)
        log.info("cuda_graphs: decode steps of %s sequences captured", self.buckets)

    def replay(self, step: StepBatch) -> torch.Tensor | None:
        """The logits of a fixed step (its inputs already in the buffers), or None without a graph for it."""
        captured = self.graphs.get(step.input_ids.shape[0])
        if captured is None:
            return None
        graph, out = captured
        graph.replay()
        return out
