"""Compiles every kernel variant the launchers can pick to cubin for sm_80 and sm_90 with no GPU
(triton.compile with a GPUTarget), and reads each cubin's resource use (registers, spills) with the
cuobjdump that ships with Triton. Run without TRITON_INTERPRET:

    python -m kernels.aot        # a table; exit status 1 if a variant fails or spills (stack / local memory)
    python -m kernels.aot paged_decode paged_reduce     # those kernels only
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

from kernels import dora_scale, lora_expand, lora_shrink, paged_attention, paged_prefill

# dtype -> (torch dtype, PRECISION the launcher passes on a GPU)
DTYPES = {"fp32": (torch.float32, "ieee"), "fp16": (torch.float16, "tf32"), "bf16": (torch.bfloat16, "tf32")}
# Shapes the launchers are sized from: tokens, max rank, d_in / slice width, segments.
TOKENS = [1, 16, 64, 256, 1024, 8192]
RANKS = [8, 16, 32, 64, 128]
DIMS = [64, 1000, 2049, 4096, 14336]
# Paged decode attention: head dims, GQA group sizes, (batch, kv heads), context capacity in tokens.
HEAD_DIMS = [16, 32, 64, 80, 96, 128, 256]
GROUPS = [1, 2, 4, 8, 16]
BATCHES = [(1, 1), (1, 8), (32, 8), (256, 8)]
CONTEXTS = [16, 512, 4096, 131072]


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


def dora_scale_variants():
    # every N past 256 gets what 256 gets
    configs = {tuple(sorted(dora_scale.dora_config(2**i).items())) for i in range(10)}
    for dt in DTYPES:
        sig = {"y_ptr": f"*{dt}", "g_ptr": "*fp32", "c_ptr": "*fp32"}
        sig |= dict.fromkeys(["dora_ptr", "sorted_ptr", "seg_slot_ptr", "seg_start_ptr", "seg_len_ptr"], "*i32")
        sig |= dict.fromkeys(["N", "stride_ym"], "i32")
        for cfg in sorted(configs):
            yield "dora_scale", dora_scale._dora_scale_kernel, dt, sig, dict(cfg)


def paged_configs(dtype) -> set[tuple[int, int, int]]:
    """(BLOCK_G, BLOCK_N, BLOCK_D) the launcher picks; NUM_SPLITS sizes the grid, not the code."""
    configs = set()
    for (b, h), g, d, n in itertools.product(BATCHES, GROUPS, HEAD_DIMS, CONTEXTS):
        cfg = paged_attention.decode_config(b, h, g, d, n, dtype)
        configs.add((cfg["BLOCK_G"], cfg["BLOCK_N"], cfg["BLOCK_D"]))
    return configs


def paged_decode_variants():
    for dt, (dtype, prec) in DTYPES.items():
        sig = dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "out_ptr"], f"*{dt}")
        sig |= dict.fromkeys(["acc_ptr", "m_ptr", "den_ptr"], "*fp32")
        sig |= dict.fromkeys(["block_table_ptr", "seq_len_ptr"], "*i32") | {"sink_ptr": "*fp32"}
        sig |= dict.fromkeys(["scale", "softcap"], "fp32")
        sig |= dict.fromkeys(["window", "block_size", "group", "head_dim", "split_len"], "i32")
        sig |= {f"stride_{s}": "i32" for s in ["qb", "qh", "kb", "kt", "kh", "vb", "vt", "vh", "ob", "oh", "bt"]}
        modes = [(False, False), (False, True), (True, False)]  # (SPLIT, HAS_SINKS): with splits, the merge adds sinks
        for (bg, bn, bd), (split, sinks) in itertools.product(sorted(paged_configs(dtype)), modes):
            consts = dict(
                BLOCK_G=bg, BLOCK_N=bn, BLOCK_D=bd, SPLIT=split, HAS_SINKS=sinks, PRECISION=prec, UPCAST=False
            )
            yield "paged_decode", paged_attention._paged_decode_kernel, dt, sig, consts


def paged_reduce_variants():
    for dt, (dtype, _) in DTYPES.items():
        sig = {"out_ptr": f"*{dt}"} | dict.fromkeys(["acc_ptr", "m_ptr", "den_ptr"], "*fp32")
        sig |= {"seq_len_ptr": "*i32", "sink_ptr": "*fp32"}
        sig |= dict.fromkeys(["head_dim", "split_len", "num_splits", "stride_ob", "stride_oh"], "i32")
        for bd, sinks in itertools.product(sorted({bd for _, _, bd in paged_configs(dtype)}), [False, True]):
            yield "paged_reduce", paged_attention._paged_reduce_kernel, dt, sig, dict(BLOCK_D=bd, HAS_SINKS=sinks)


def paged_prefill_variants():
    """Every (BLOCK_M, BLOCK_N, BLOCK_D) prefill_config picks over HEAD_DIMS x GROUPS, with and without sinks."""
    for dt, (dtype, prec) in DTYPES.items():
        sig = dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "out_ptr"], f"*{dt}")
        sig |= dict.fromkeys(["block_table_ptr", "q_start_ptr", "q_len_ptr", "kv_len_ptr"], "*i32")
        sig |= {"sink_ptr": "*fp32"} | dict.fromkeys(["scale", "softcap"], "fp32")
        sig |= dict.fromkeys(["window", "block_size", "group", "head_dim"], "i32")
        sig |= {f"stride_{s}": "i32" for s in ["qt", "qh", "kb", "kt", "kh", "vb", "vt", "vh", "ot", "oh", "bt"]}
        configs = {
            tuple(sorted(paged_prefill.prefill_config(d, g, dtype).items()))
            for d, g in itertools.product(HEAD_DIMS, GROUPS)
        }
        for cfg, sinks in itertools.product(sorted(configs), [False, True]):
            consts = {**dict(cfg), "HAS_SINKS": sinks, "PRECISION": prec, "UPCAST": False}
            yield "paged_prefill", paged_prefill._paged_prefill_kernel, dt, sig, consts


# Arguments Triton's launcher finds to be multiples of 16 and specializes on (pointers; strides and sizes when
# the head dim is a multiple of 16): without them the paged kernels' gathers would not vectorize here.
ALIGNED = {
    "paged_decode": [
        "head_dim",
        "split_len",
        *(f"stride_{s}" for s in ["qb", "qh", "kb", "kt", "kh", "vb", "vt", "vh", "ob", "oh"]),
    ],
    "paged_reduce": ["head_dim", "split_len", "stride_ob", "stride_oh"],
    "paged_prefill": [
        "head_dim",
        *(f"stride_{s}" for s in ["qt", "qh", "kb", "kt", "kh", "vb", "vt", "vh", "ot", "oh"]),
    ],
}


def attrs(name: str, sig: dict) -> dict:
    if name not in ALIGNED:
        return {}
    aligned = [a for a, t in sig.items() if t.startswith("*")] + ALIGNED[name]
    return {(list(sig).index(a),): [["tt.divisibility", 16]] for a in aligned}


def resources(cubin: bytes) -> dict:
    """REG / STACK / LOCAL (spills) of a cubin, from cuobjdump -res-usage."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def variants():
    return [
        *shrink_variants(),
        *expand_variants(),
        *dora_scale_variants(),
        *paged_decode_variants(),
        *paged_reduce_variants(),
        *paged_prefill_variants(),
    ]


def compile_all(ccs=(80, 90), kernels: list[str] | None = None) -> list[dict]:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs the real @triton.jit, not the interpreter"
    rows = []
    chosen = [v for v in variants() if not kernels or v[0] in kernels]
    assert chosen, f"no variants of {kernels}"
    for (name, fn, dt, sig, consts), cc in itertools.product(chosen, ccs):
        row = {"kernel": name, "dtype": dt, "sm": cc, **{k: v for k, v in consts.items() if k.isupper()}}
        try:
            compiled = triton.compile(ASTSource(fn, sig, consts, attrs(name, sig)), target=GPUTarget("cuda", cc, 32))
            row |= {"ok": True, "shared": compiled.metadata.shared, **resources(compiled.asm["cubin"])}
        except Exception as e:  # reported, and the run fails
            row |= {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
    return rows


CONFIG_KEYS = ("BLOCK_M", "BLOCK_G", "BLOCK_N", "BLOCK_K", "BLOCK_D", "SPLIT_K", "SPLIT", "HAS_SINKS")


def main(kernels: list[str] | None = None) -> int:
    rows = compile_all(kernels=kernels)
    for r in rows:
        cfg = " ".join(f"{k}={r[k]}" for k in CONFIG_KEYS if k in r)
        res = (
            f"reg={r.get('REG')} stack={r.get('STACK')} local={r.get('LOCAL')} shared={r.get('shared')}"
            if r["ok"]
            else r["error"]
        )
        print(f"{r['kernel']:12} {r['dtype']} sm_{r['sm']} {cfg:60} {res}")
    failed = [r for r in rows if not r["ok"] or r.get("STACK") or r.get("LOCAL")]
    print(f"{len(rows) - len(failed)} / {len(rows)} variants compiled without a stack frame or spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
