"""Paged KV cache: the K/V of every attention layer in fixed-size blocks of one shared pool. A sequence
holds a block table (block ids in order) that grows as it does; nothing is reserved for the context it
might reach. The pool is sized from a memory budget and allocated when the model loads; who holds which
block is backend/engine/block_pool.py's."""

import math
import re
from dataclasses import dataclass

import torch

GiB = 2**30
CPU_DEFAULT_BYTES = 1 * GiB
GPU_DEFAULT_FRACTION = 0.9
UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": GiB}


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    head_dim: int


def parse_budget(text: str, setting: str = "kv_cache_memory") -> tuple[float, str]:
    """ "4GiB" -> (4 * 2**30, "bytes"); "0.9" -> (0.9, "fraction"); "auto" -> (0, "auto")."""
    t = text.strip().lower().replace(" ", "")
    if t == "auto":
        return 0.0, "auto"
    m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([a-z]*)", t)
    if not m or m.group(2) not in UNITS:
        raise ValueError(f"{setting} {text!r}: expected auto, a fraction like 0.9, or bytes like 4GiB")
    value = float(m.group(1))
    if not m.group(2) and 0 < value <= 1:
        return value, "fraction"
    if value * UNITS[m.group(2)] < 1:
        raise ValueError(f"{setting} {text!r} is not a positive size")
    return value * UNITS[m.group(2)], "bytes"


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def budget_bytes(setting: str, device: torch.device) -> int:
    value, kind = parse_budget(setting)
    if kind == "bytes":
        return int(value)
    if kind == "auto" and device.type != "cuda":
        return CPU_DEFAULT_BYTES
    return int(free_memory(device) * (value if kind == "fraction" else GPU_DEFAULT_FRACTION))


def fmt_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@dataclass(frozen=True)
class CachePlan:
    block_size: int
    num_blocks: int
    bytes_per_token: int

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_size * self.bytes_per_token

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


def plan_cache(
    layers: list[LayerShape], dtype: torch.dtype, budget: int, block_size: int, max_len: int, max_seqs: int
) -> CachePlan:
    """As many blocks as `budget` holds, but no more than `max_seqs` sequences of `max_len` need.
    Raises when the budget cannot hold one sequence of `max_len`."""
    assert block_size > 0 and block_size & (block_size - 1) == 0, f"kv_block_size {block_size}: a power of two"
    per_token = sum(2 * s.kv_heads * s.head_dim for s in layers) * dtype.itemsize
    per_seq = math.ceil(max_len / block_size)
    blocks = min(budget // (per_token * block_size), per_seq * max_seqs)
    if blocks < per_seq:
        raise ValueError(
            f"the KV cache budget {fmt_bytes(budget)} ({budget} bytes) holds {blocks * block_size} tokens at "
            f"{per_token} bytes per token; one sequence of max_model_len {max_len} needs "
            f"{fmt_bytes(per_seq * block_size * per_token)}. Raise kv_cache_memory or lower max_model_len."
        )
    return CachePlan(block_size, blocks, per_token)


class KVCache:
    """k[layer], v[layer]: [num_blocks * block_size, kv_heads, head_dim]; a token's row is
    block * block_size + offset."""

    def __init__(
        self, plan: CachePlan, layers: list[LayerShape], dtype: torch.dtype, device: torch.device, spare_blocks: int = 0
    ):
        """spare_blocks: past the plan's, given to no sequence (padding rows of replayed steps write there)."""
        self.plan = plan
        self.block_size = plan.block_size
        rows = (plan.num_blocks + spare_blocks) * plan.block_size
        self.k = [torch.zeros(rows, s.kv_heads, s.head_dim, dtype=dtype, device=device) for s in layers]
        self.v = [torch.zeros_like(k) for k in self.k]

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)
