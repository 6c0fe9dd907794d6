"""Runs a Hugging Face causal LM on a flat batch of tokens from many sequences.

All tokens of a step (prefill chunks and decode tokens of every running sequence) go through the
model as one row [1, T], so each linear layer, and its LoRA deltas, sees the whole mixed batch at
once. Attention is ours (backend.model.attention): each token's K/V goes to its sequence's blocks of the
paged cache and it attends within its sequence. Works for any model that calls transformers'
attention interface (Llama, Mistral, Qwen2, Phi-3, Gemma-2, GPT-2, ...) with arguments we apply.
"""

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from backend.config import context_length
from backend.lora import ops as lora_ops
from backend.lora.layers import LoRAContext, LoRALinear, wrap_model
from backend.model import cuda_graphs, dense, fused, lean
from backend.model.attention import AttnArgs, PagedAttention, UnsupportedAttention
from backend.model.checks import check_config, check_layers
from backend.model.hybrid import merge_at_load
from backend.model.input_batch import InputBatch, SeqWork, StepBatch
from backend.model.kv_cache import KVCache, LayerShape, budget_bytes, fmt_bytes, plan_cache
from backend.model.rope import per_sequence_rope

log = logging.getLogger("lora_engine")
ATTENTION = "lora_engine"


class LayerAttention:
    """The engine's attention for one attention module. Before the cache exists (the probe forward at
    load) it records the layer's K/V shape and checks the arguments the model passes."""

    def __init__(self, runner: "ModelRunner", name: str):
        self.runner, self.name = runner, name
        self.shape: LayerShape | None = None
        self.args: AttnArgs | None = None
        self.arg_names: frozenset[str] = frozenset()
        self.paged: PagedAttention | None = None

    def __call__(self, q, k, v, kwargs: dict) -> torch.Tensor:
        if frozenset(kwargs) != self.arg_names:
            self.args = AttnArgs.parse(f"{self.runner.arch} layer {self.name}", q.shape[-1], kwargs)
            self.arg_names = frozenset(kwargs)
        if self.paged is None:  # the probe
            self.shape = LayerShape(k.shape[1], k.shape[3])
            return torch.zeros(1, q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device)
        return self.paged(q, k, v, self.runner.step.attention, self.args)


def engine_attention(module, query, key, value, attention_mask, **kwargs):
    return module.lora_attention(query, key, value, kwargs), None


AttentionInterface.register(ATTENTION, engine_attention)


class ModelRunner:
    """Owns the model, its LoRA layers and the KV cache; `forward` gives next-token logits per sequence."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: torch.dtype,
        device: str,
        max_seqs: int,
        max_len: int,
        num_slots: int,
        max_rank: int,
        targets="all-linear",
        lora_backend: str = "auto",
        kv_cache_memory: str = "auto",
        kv_block_size: int = 16,
        attention_backend: str = "auto",
        merged_lora: Path | None = None,
        lean_forward: bool = True,
        max_tokens: int = 0,  # the most tokens in a step; 0: a whole context and a decode token per sequence
        use_cuda_graphs: bool = False,
    ):
        check_config(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=ATTENTION)
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.config = self.model.config
        self.arch = type(self.model).__name__
        self.max_len = context_length(self.config.to_dict(), max_len)
        if not self.max_len:
            raise ValueError(f"{self.arch}: the model's config gives no context length; set max_model_len")
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        check_layers(self.model, self.arch)
        self.merged = None  # before the layers are wrapped and packed
        if merged_lora is not None:
            self.merged = merge_at_load(self.model, merged_lora, targets, max_rank)
        self.module_names = [n for n, _ in self.model.named_modules() if n]
        ops = lora_ops.LoRAOps(lora_backend, self.device)
        self.lora: LoRAContext = wrap_model(self.model, targets, num_slots, max_rank, ops)
        self.shapes = {n: (layer.d_in, layer.d_out) for n, layer in self.lora.layers.items()}
        if self.device.type == "cpu" and dense.packing_works(self.model.dtype):
            for group in self.lora.groups:
                group.replace_linear(dense.PackedLinear(group.linear))
            embeddings = (m for m in self.model.modules() if isinstance(m, torch.nn.Embedding))
            dense.pack_linears(self.model, {m.weight.data_ptr() for m in embeddings})
            dense.own_memory(self.model)
        fused.fuse_norms(self.model)
        self.lora_on_output = isinstance(self.model.get_output_embeddings(), LoRALinear)
        self.step: StepBatch | None = None
        self.graphs: cuda_graphs.DecodeGraphs | None = None  # with use_cuda_graphs, once the cache exists
        self.lean: lean.LeanModel | None = None  # set after the probe, which runs transformers' forward
        self.rope = per_sequence_rope(self.model, self.arch, lambda: self.step and self.step.spans)
        self.paged_kernel = lora_ops.pick_backend(attention_backend, self.device, "attention_backend") == "triton"
        self.block_size = kv_block_size
        self.batch = InputBatch(
            max_tokens=max_tokens or self.max_len + max_seqs,
            max_seqs=max_seqs,
            max_blocks=-(-self.max_len // kv_block_size),
            num_slots=num_slots,
            block_size=kv_block_size,
            device=self.device,
            ops=ops,
            paged_kernel=self.paged_kernel,
            lora_on_output=self.lora_on_output,
        )
        self.layers = self._hook_attention()
        shapes = [layer.shape for layer in self.layers]
        budget = budget_bytes(kv_cache_memory, self.device)
        plan = plan_cache(shapes, self.model.dtype, budget, kv_block_size, self.max_len, max_seqs)
        self.kv = KVCache(plan, shapes, self.model.dtype, self.device, spare_blocks=int(use_cuda_graphs))
        for i, layer in enumerate(self.layers):
            layer.paged = PagedAttention(self.kv.k[i], self.kv.v[i], kv_block_size, self.paged_kernel)
        self.lean = lean.LeanModel(self.model, self.layers) if lean_forward and lean.fits(self.model) else None
        if use_cuda_graphs:
            self._replayable(max_seqs)
        self.kv_summary = (
            f"KV cache {fmt_bytes(plan.nbytes)}: {plan.num_blocks} blocks of {plan.block_size} tokens, "
            f"{plan.tokens} tokens at {plan.bytes_per_token} bytes each (kv_cache_memory {kv_cache_memory}: "
            f"{fmt_bytes(budget)}); max_model_len {self.max_len}"
        )
        log.info(self.kv_summary)

    def _hook_attention(self) -> list[LayerAttention]:
        """Puts the engine's attention into every attention module and runs one token through the model
        to learn each layer's K/V shape and check its arguments. Refuses what it cannot serve exactly."""
        named = [
            (n, m) for n, m in self.model.named_modules() if hasattr(m, "layer_idx") and getattr(m, "is_causal", False)
        ]
        if not named:
            raise UnsupportedAttention(f"{self.arch}: no attention layer uses transformers' attention interface")
        layers = []
        for name, module in named:
            module.lora_attention = LayerAttention(self, name)
            layers.append(module.lora_attention)
        self.forward(self.make_step([SeqWork([0], [0], 0, -1)]))
        missed = [layer.name for layer in layers if layer.shape is None]
        if missed:
            raise UnsupportedAttention(
                f"{self.arch}: attention layer {missed[0]} does not go through transformers' attention interface"
            )
        return layers

    def make_step(self, work: list[SeqWork]) -> StepBatch:
        bucket = self.graphs.bucket(work) if self.graphs is not None else 0
        if not bucket:
            return self.batch.build(work)
        step = self.batch.build(self.graphs.padded(work, bucket), fixed=True)
        return dataclasses.replace(step, real=len(work))

    @torch.inference_mode()
    def forward(self, step: StepBatch) -> torch.Tensor:
        """-> logits [B, vocab] (fp32) at the last token of each sampled sequence."""
        logits = self.graphs.replay(step) if step.fixed else None
        if logits is None:
            logits = self._forward(step)
        return logits[: step.real] if step.real else logits

    def _forward(self, step: StepBatch) -> torch.Tensor:
        self.step, self.lora.step = step, step.lora
        try:
            if self.lean is not None:
                return self.lean(step.input_ids, step.positions, step.last, step.attention).float()
            out = self.model(
                input_ids=step.input_ids[None],
                position_ids=step.positions[None],
                use_cache=False,
                logits_to_keep=step.last,
            )
        finally:
            self.step = self.lora.step = None
        return out.logits[0].float()

    def _replayable(self, max_seqs: int) -> None:
        """Decode steps padded to buckets, replayed from CUDA graphs once `graphs.capture()` has run."""
        why = cuda_graphs.refusal(self)
        if why:
            raise ValueError(why)
        for layer in self.lora.layers.values():  # DoRA's g and c where a replay reads them, from the start
            layer.w.make_dora()
        self.graphs = cuda_graphs.DecodeGraphs(self, self._forward, self.kv.num_blocks, max_seqs)
