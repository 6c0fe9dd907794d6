"""RoPE per sequence. The engine runs every token of a step as one row [1, T]. transformers' `dynamic` and
`longrope` rope types (dynamic_rope_update) pick their frequencies from the largest position in that row, so a
long sequence would change the RoPE of every short one beside it: their rotary modules are called once per
sequence instead (sequences that get the same frequencies share a call) and the results joined in token order.
Each call also sees the sequence's whole length, by one extra position whose output is dropped: a prompt fed in
chunks gets the frequencies transformers gives it fed at once. Every other rope type (default, linear, yarn,
llama3, proportional) depends on each token's position alone and passes straight through."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from backend.model.checks import UnsupportedModel

Spans = tuple[tuple[int, int, int], ...]  # (first token, tokens, whole length) of each sequence of a step


def batch_dependent(rope_type: str) -> bool:
    """The types dynamic_rope_update recomputes from max(position_ids) (PhiMoE's mscale too, under longrope)."""
    return "dynamic" in rope_type or rope_type == "longrope"


def rope_types(value) -> set[str]:
    """A rope type, a config's rope parameters, or either by layer type (Gemma-3's local / global)."""
    if isinstance(value, str):
        return {value}
    if not isinstance(value, dict):
        return set()
    if "rope_type" in value or "type" in value:
        return rope_types(value.get("rope_type", value.get("type")))
    return {t for v in value.values() for t in rope_types(v)}


def joined(parts: list, dim: int):
    """Per-sequence outputs (a tensor, or a tuple such as (cos, sin)) joined along the token axis."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim)
    return type(parts[0])(torch.cat(p, dim) for p in zip(*parts))


def split(out, dim: int, sizes: list[int]) -> list:
    """An output (a tensor or a tuple of them) cut along the token axis into `sizes`."""
    if isinstance(out, torch.Tensor):
        return list(out.split(sizes, dim))
    return [type(out)(p) for p in zip(*(t.split(sizes, dim) for t in out))]


def frequency_key(module: nn.Module, layer_type=None) -> Callable[[int], object]:
    """Sequence lengths that get the same frequencies from `module` share a key, and their sequences one call:
    longrope has two sets (up to its original length and past it), dynamic one up to its original length."""
    rope_type, params = module.rope_type, getattr(getattr(module, "config", None), "rope_parameters", None) or {}
    if isinstance(rope_type, dict):
        rope_type, params = rope_type.get(layer_type), params.get(layer_type) or {}
    if rope_type == "longrope" and "original_max_position_embeddings" in params:
        return lambda n: n > params["original_max_position_embeddings"]
    if rope_type == "dynamic" and hasattr(module, "original_max_seq_len"):
        return lambda n: max(n, module.original_max_seq_len)
    return lambda n: n


@dataclass
class SpanRope:
    """A rotary module's forward, called once per group of the step's sequences that get the same frequencies,
    with their positions and one more, the group's whole length - 1, whose output is dropped."""

    module: nn.Module
    forward: Callable  # the module's own
    spans: Callable[[], Spans | None]  # None outside an engine step
    resets: bool  # dynamic keeps the longest length it has seen: each call starts from the original

    def __call__(self, x, position_ids, *args, **kwargs):
        spans = self.spans()
        if spans is None:
            return self.forward(x, position_ids, *args, **kwargs)
        ends = [0] + [s + n for s, n, _ in sorted(spans)]
        if sorted(s for s, _, _ in spans) != ends[:-1] or ends[-1] != position_ids.shape[-1]:
            raise RuntimeError(f"rotary embedding got {position_ids.shape[-1]} positions; the step has {spans}")
        key = frequency_key(self.module, kwargs.get("layer_type", args[0] if args else None))
        groups: dict[object, list[tuple[int, int, int]]] = {}
        for span in spans:
            groups.setdefault(key(span[2]), []).append(span)
        dim, parts = position_ids.dim() - 1, {}
        for group in groups.values():
            own = [position_ids[..., s : s + n] for s, n, _ in group]
            whole = torch.full_like(own[0][..., :1], max(length for _, _, length in group) - 1)
            if self.resets:  # transformers' own reset: a length below the original restores the original frequencies
                self.forward(x, torch.zeros_like(whole), *args, **kwargs)
            out = self.forward(x, torch.cat([*own, whole], -1), *args, **kwargs)
            parts.update(zip(group, split(out, dim, [n for _, n, _ in group] + [1])))
        return joined([parts[span] for span in sorted(spans)], dim)


def rotary_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if rope_types(getattr(m, "rope_type", None))}


def per_sequence_rope(model: nn.Module, arch: str, spans: Callable[[], Spans | None]) -> list[str]:
    """Wraps each rotary module whose rope type depends on the batch; returns their names. A module's own
    rope_type wins over the config's (HunYuan calls a fixed NTK-alpha RoPE `dynamic` in its config). Refuses a
    model whose config names a batch-dependent type when no rotary module carries a rope type."""
    modules = rotary_modules(model)
    wrapped = []
    for name, module in modules.items():
        types = rope_types(module.rope_type)
        if any(batch_dependent(t) for t in types):
            module.forward = SpanRope(module, module.forward, spans, any("dynamic" in t for t in types))
            wrapped.append(name)
    config = model.config.get_text_config()
    configured = sorted(t for t in rope_types(getattr(config, "rope_parameters", None)) if batch_dependent(t))
    if configured and not modules:
        raise UnsupportedModel(
            f"{arch}: rope type {configured[0]!r} takes its frequencies from the whole batch's positions and the "
            "model computes it in no rotary module the engine can call per sequence"
        )
    return wrapped
