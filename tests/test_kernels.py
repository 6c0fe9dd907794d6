"""lora_shrink / lora_expand against their torch references: compiled on a GPU, under the Triton
interpreter without one (this machine, CI).

Grid: dtype x rank (one or mixed per slot) x tokens x distinct adapters x sizes (odd d_in) x base-only
tokens x token order x slices (one; fused q/k/v with GQA widths; fused gate/up). The default run takes
a representative set (every value of every axis at least once); the full product is marked slow.
Padding past each slot's rank is NaN: a kernel that reads it fails.
"""

import ast
import itertools
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

from kernels.lora_expand import expand_config, lora_expand, lora_expand_ref  # noqa: E402
from kernels.lora_shrink import lora_shrink, lora_shrink_ref, shrink_config  # noqa: E402
from kernels.segments import segment_tokens  # noqa: E402

# dtype -> (atol, rtol) of y against the reference (which rounds once, at the end) and of t
TOLERANCE = {
    torch.float32: {"y": (1e-4, 1e-4), "t": (1e-4, 1e-4)},
    torch.float16: {"y": (2e-2, 1e-2), "t": (1e-3, 1e-3)},
    torch.bfloat16: {"y": (1e-1, 2e-2), "t": (1e-3, 1e-3)},
}
RANKS = [1, 4, 8, 16, 64, "mixed"]
TOKENS = [1, 7, 64, 300]
ADAPTERS = [1, 3, "every token"]
SIZES = {"small": (64, [96]), "odd": (2049, [1000])}  # d_in, slice widths
SLICES = {"one": None, "qkv": [128, 32, 32], "gate_up": [160, 160]}  # widths for d_in 64
MAX_RANK = 64


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float16
    rank: int | str = 16
    tokens: int = 64
    adapters: int | str = 3
    size: str = "small"
    base_tokens: bool = True
    shuffled: bool = True
    slices: str = "one"

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{dt}-r{self.rank}-T{self.tokens}-A{self.adapters}-{self.size}-base{int(self.base_tokens)}-" + (
            f"{'shuf' if self.shuffled else 'sorted'}-{self.slices}"
        )


def build(case: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    d_in, widths = SIZES[case.size]
    widths = SLICES[case.slices] or widths
    num_adapters = case.tokens if case.adapters == "every token" else case.adapters
    num_slots = num_adapters + 1  # one slot stays empty
    slots = rng.sample(range(num_slots), num_adapters)
    token_slots = [slots[i % num_adapters] for i in range(case.tokens)]
    if case.base_tokens and case.tokens > 1:
        for i in rng.sample(range(case.tokens), max(1, case.tokens // 4)):
            token_slots[i] = -1
    if case.shuffled:
        rng.shuffle(token_slots)
    else:
        token_slots.sort()

    def rank_of(slot: int, sl: int) -> int:
        if case.rank == "mixed":
            return [1, 4, 8, 16, 64][(slot + sl) % 5]
        return case.rank

    L, N = len(widths), sum(widths)
    starts = [sum(widths[:i]) for i in range(L)]
    a = torch.full((L, num_slots, MAX_RANK, d_in), float("nan")).to(case.dtype)
    b = torch.full((num_slots, N, MAX_RANK), float("nan")).to(case.dtype)
    ranks = torch.zeros(L, num_slots, dtype=torch.int32)
    scales = torch.zeros(L, num_slots, dtype=torch.float32)
    for slot in slots:
        for sl in range(L):
            r = rank_of(slot, sl)
            cols = slice(starts[sl], starts[sl] + widths[sl])
            a[sl, slot, :r] = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(case.dtype)
            b[slot, cols, :r] = (torch.randn(widths[sl], r, generator=gen) / r**0.5).to(case.dtype)
            ranks[sl, slot], scales[sl, slot] = r, rng.uniform(0.5, 2.0)
    x = torch.randn(case.tokens, d_in, generator=gen).to(case.dtype)
    y = torch.randn(case.tokens, N + 8, generator=gen).to(case.dtype)  # wider than the slices: an offset
    token_slots = torch.tensor(token_slots, dtype=torch.int32)
    return *(v.to(DEVICE) for v in (x, y, a, b, ranks, scales, token_slots)), starts, widths


def run(case: Case, seed: int = 0, configs: str = "interpreter", shrink_cfg: dict | None = None):
    """configs: the launchers' own choice here ("interpreter": big blocks), or the tiles a GPU gets ("gpu")."""
    x, y, a, b, ranks, scales, token_slots, starts, widths = build(case, seed)
    seg = segment_tokens(token_slots)
    args = (seg.sorted_tokens, seg.slots, seg.starts, seg.lens, seg.max_len)
    expand_cfg = None
    if configs == "gpu" or DEVICE.type == "cuda":
        shrink_cfg = shrink_cfg or shrink_config(len(seg.sorted_tokens), MAX_RANK, x.shape[1], len(seg.host), x.dtype)
        expand_cfg = expand_config(MAX_RANK, max(widths))
    t = lora_shrink(x, a, ranks, scales, *args, config=shrink_cfg)
    t_ref = lora_shrink_ref(x, a, ranks, scales, token_slots)
    starts_t, widths_t = (torch.tensor(v, dtype=torch.int32, device=DEVICE) for v in (starts, widths))
    y_ref = lora_expand_ref(y, t_ref, b, ranks, starts_t, widths_t, token_slots, y_offset=8)
    out = y.clone()
    lora_expand(out, t, b, ranks, starts_t, widths_t, max(widths), *args, y_offset=8, config=expand_cfg)
    return defined(t.sum(0), ranks, token_slots), t_ref, out, y_ref, y, token_slots


def defined(t: torch.Tensor, ranks: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """t [L, T, R] with what lora_shrink leaves unwritten (tokens without an adapter, columns past a
    slot's rank) set to 0, as in the reference."""
    cols = torch.arange(t.shape[2], device=t.device)
    slot_rank = ranks[:, token_slots.clamp(min=0)] * (token_slots >= 0)  # [L, T]
    return torch.where(cols < slot_rank[:, :, None], t, 0.0)


def check(case: Case, **kw) -> None:
    t, t_ref, out, y_ref, y, token_slots = run(case, **kw)
    tol = TOLERANCE[case.dtype]
    assert not t.isnan().any() and not out.isnan().any(), "read past a slot's rank (NaN padding)"
    torch.testing.assert_close(t, t_ref, atol=tol["t"][0], rtol=tol["t"][1])
    torch.testing.assert_close(out.float(), y_ref.float(), atol=tol["y"][0], rtol=tol["y"][1])
    base = token_slots < 0
    assert torch.equal(out[base], y[base]), "a base-only token changed"
    assert torch.equal(out[:, :8], y[:, :8]), "a column before the offset changed"


def representative() -> list[Case]:
    """Every value of every axis at least once, around a middle case, plus a few hard mixes."""
    base = Case()
    cases = [base]
    axes = {
        "dtype": list(TOLERANCE),
        "rank": RANKS,
        "tokens": TOKENS,
        "adapters": ADAPTERS,
        "size": list(SIZES),
        "base_tokens": [True, False],
        "shuffled": [True, False],
        "slices": list(SLICES),
    }
    for axis, values in axes.items():
        cases += [replace(base, **{axis: v}) for v in values if v != getattr(base, axis)]
    cases += [
        Case(torch.float32, "mixed", 300, "every token", "odd"),
        Case(torch.bfloat16, "mixed", 7, "every token", "odd", slices="one"),
        Case(torch.float16, "mixed", 300, 3, "small", slices="qkv"),
        Case(torch.bfloat16, 64, 1, 1, "odd", base_tokens=False),
        Case(torch.float32, "mixed", 64, "every token", "small", slices="gate_up"),
    ]
    return list(dict.fromkeys(cases))


def full_grid() -> list[Case]:
    product = itertools.product(TOLERANCE, RANKS, TOKENS, ADAPTERS, SIZES, [True, False], [True, False])
    cases = [Case(*values) for values in product]
    cases += [Case(dt, "mixed", n, a, slices=s) for dt in TOLERANCE for n in TOKENS for a in ADAPTERS for s in SLICES]
    return [c for c in dict.fromkeys(cases) if c not in set(representative())]


def representative_runs() -> list:
    """(case, configs) for every representative case; the one that takes a minute under the
    interpreter with a GPU's tiles runs in the heavy stage."""
    heavy = Case(torch.float32, "mixed", 300, "every token", "odd")
    return [
        pytest.param(case, configs, marks=[pytest.mark.heavy] if (case, configs) == (heavy, "gpu") else [])
        for case in representative()
        for configs in ("interpreter", "gpu")
    ]


@pytest.mark.parametrize("case, configs", representative_runs(), ids=str)
def test_kernels_match_reference(case, configs):
    check(case, configs=configs)


@pytest.mark.slow
@pytest.mark.parametrize("case", full_grid(), ids=str)
def test_kernels_match_reference_full_grid(case):
    check(case)


@pytest.mark.parametrize("split_k", [1, 2, 8])
def test_split_k_gives_the_same_t(split_k):
    """Split-K (partial sums per split, added by expand) and a single pass compute the same t and y."""
    case = Case(torch.float32, "mixed", 64, 3, "odd")
    cfg = {**shrink_config(64, MAX_RANK, 2049, 3), "SPLIT_K": split_k}
    t, t_ref, out, y_ref, *_ = run(case, configs="gpu", shrink_cfg=cfg)
    torch.testing.assert_close(t, t_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, y_ref, atol=1e-4, rtol=1e-4)


def test_no_adapter_tokens_is_a_no_op():
    assert segment_tokens(torch.full((5,), -1, dtype=torch.int32)) is None


def test_segments_group_tokens_by_slot():
    seg = segment_tokens(torch.tensor([3, -1, 0, 3, 0, -1, 2], dtype=torch.int32))
    assert seg.host == ((0, 0, 2), (2, 2, 1), (3, 3, 2))
    assert seg.sorted_tokens.tolist() == [2, 4, 6, 0, 3]  # stable within a slot
    assert seg.max_len == 2


def test_every_variant_compiles_to_cubin_for_sm80_and_sm90():
    """triton.compile(..., target=GPUTarget("cuda", 80 | 90, 32)) on this GPU-less machine, in a process of its
    own (this one runs the interpreter); no variant may spill (stack frame or local memory). The LoRA kernels
    here; the attention and DoRA kernels in their own test files."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "kernels.aot", "lora_shrink", "lora_expand"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    compiled, total = map(int, re.search(r"(\d+) / (\d+) variants compiled", done.stdout).groups())
    assert compiled == total > 0
    assert {"sm_80", "sm_90"} <= set(re.findall(r"sm_\d+", done.stdout))


def test_only_the_wrapper_imports_kernels():
    root = Path(__file__).resolve().parent.parent
    importers = set()
    for folder in ["backend", "model_repository", "client"]:
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n == "kernels" or n.startswith("kernels.") for n in names):
                    importers.add(str(path.relative_to(root)))
    assert importers == {"backend/lora/ops.py", "backend/model/attention.py"}  # the LoRA and the attention wrappers
