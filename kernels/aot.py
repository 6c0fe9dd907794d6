"""Compiles every kernel variant the launchers can pick to cubin for sm_80 and sm_90 with no GPU
(triton.compile with a GPUTarget), and reads each cubin's resource use (registers, spills) with the
cuobjdump that ships with Triton. Run without TRITON_INTERPRET:

    python -m kernels.aot        # a table; exit status 1 if a variant fails or spills (stack / local memory)
"""

import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import lora_expand, lora_shrink

# dtype -> (torch dtype, PRECISION the launcher passes on a GPU)
DTYPES = {"fp32": (torch.float32, "ieee"), "fp16": (torch.float16, "tf32"), "bf16": (torch.bfloat16, "tf32")}
# Shapes the launchers are sized from: tokens, max rank, d_in / slice width, segments.
TOKENS = [1, 16, 64, 256, 1024, 8192]
RANKS = [8, 16, 32, 64, 128]
DIMS = [64, 1000, 2049, 4096, 14336]


def shrink_variants():
    for dt, (dtype, prec) in DTYPES.items():
        configs = {
            tuple(sorted(lora_shrink.shrink_config(t, r, d, seg, dtype).items()))
            for t, r, d in itertools.product(TOKENS, RANKS, DIMS)
            for seg in {1, min(8, t), t}
        }
        sig = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "t_ptr": "*fp32"}
        sig |= dict.fromkeys(["sorted_ptr", "seg_slot_ptr", "seg_start_ptr", "seg_len_ptr", "rank_ptr"], "*i32")
        sig |= {"scale_ptr": "*fp32"} | dict.fromkeys(["d_in", "max_rank", "num_slots"], "i32")
        sig |= {f"stride_{s}": "i32" for s in ["xm", "xk", "al", "as", "ar", "ak", "ts", "tl", "tm", "tr"]}
        for cfg in sorted(configs):
            yield (
                "lora_shrink",
                lora_shrink._lora_shrink_kernel,
                dt,
                sig,
                {**dict(cfg), "PRECISION": prec, "UPCAST": False},
            )


def expand_variants():
    configs = {tuple(sorted(lora_expand.expand_config(r, w).items())) for r, w in itertools.product(RANKS, DIMS)}
    for dt, (_, prec) in DTYPES.items():
        sig = {"t_ptr": "*fp32", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}"}
        sig |= dict.fromkeys(["sorted_ptr", "seg_slot_ptr", "seg_start_ptr", "seg_len_ptr", "rank_ptr"], "*i32")
        sig |= dict.fromkeys(["slice_start_ptr", "slice_width_ptr"], "*i32")
        sig |= dict.fromkeys(["num_slots", "max_width", "y_offset", "num_splits"], "i32")
        sig |= {f"stride_{s}": "i32" for s in ["ts", "tl", "tm", "tr", "bs", "bn", "br", "ym", "yn"]}
        for cfg in sorted(configs):
            yield (
                "lora_expand",
                lora_expand._lora_expand_kernel,
                dt,
                sig,
                {**dict(cfg), "PRECISION": prec, "UPCAST": False},
            )


def resources(cubin: bytes) -> dict:
    """REG / STACK / LOCAL (spills) of a cubin, from cuobjdump -res-usage."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def compile_all(ccs=(80, 90)) -> list[dict]:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs the real @triton.jit, not the interpreter"
    rows = []
    for (name, fn, dt, sig, consts), cc in itertools.product([*shrink_variants(), *expand_variants()], ccs):
        row = {"kernel": name, "dtype": dt, "sm": cc, **{k: v for k, v in consts.items() if k.isupper()}}
        try:
            compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cc, 32))
            row |= {"ok": True, "shared": compiled.metadata.shared, **resources(compiled.asm["cubin"])}
        except Exception as e:  # reported, and the run fails
            row |= {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
    return rows


def main() -> int:
    rows = compile_all()
    for r in rows:
        cfg = " ".join(f"{k}={r[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K") if k in r)
        res = (
            f"reg={r.get('REG')} stack={r.get('STACK')} local={r.get('LOCAL')} shared={r.get('shared')}"
            if r["ok"]
            else r["error"]
        )
        print(f"{r['kernel']:12} {r['dtype']} sm_{r['sm']} {cfg:44} {res}")
    failed = [r for r in rows if not r["ok"] or r.get("STACK") or r.get("LOCAL")]
    print(f"{len(rows) - len(failed)} / {len(rows)} variants compiled without a stack frame or spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
