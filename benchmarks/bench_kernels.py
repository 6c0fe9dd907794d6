"""LoRA kernels on a GPU: correctness against the torch references, and time against (a) a torch
gather + bmm baseline, (b) PEFT's per-adapter path, (c) the memory-bandwidth floor (the bytes that
must move / the device-to-device copy bandwidth measured in the same run). One shrink + expand per
case; fp16; d = 4096; T in {1, 16, 64, 256, 1024}; r in {8, 16, 64}; 1, 8 or T distinct adapters.

Paged decode attention the same way: against its torch reference and the floor (the K/V bytes of every
visible token / the copy bandwidth). B in {1, 32, 128} sequences of 512, 4096 or 32768 tokens; Hq/Hkv 32/8,
D 128, fp16 and bf16, blocks of 16 tokens, shuffled.

    python benchmarks/bench_kernels.py --commit $(git rev-parse --short HEAD)   # on a GPU
    python benchmarks/bench_kernels.py --smoke --out /tmp/x                      # CPU: the code path only

Writes <out>/kernels-<device>-<date>.csv and .md, <out>/paged-attention-<device>-<date>.csv and .md
(default out: benchmarks/results).
"""

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backend.lora.ops import LoRAOps, SlotWeights  # noqa: E402
from benchmarks.report import slug, write_csv  # noqa: E402
from kernels.lora_expand import lora_expand, lora_expand_ref  # noqa: E402
from kernels.lora_shrink import lora_shrink, lora_shrink_ref  # noqa: E402
from kernels.paged_attention import decode_config, paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from kernels.segments import segment_tokens  # noqa: E402

ROTATE_BYTES = 512 * 2**20  # input sets cycled per timed run: well past any L2


class Case:
    """x [T, d], y [T, d], one adapter per token out of `num_adapters`, rank r, every slot filled."""

    def __init__(self, tokens: int, rank: int, num_adapters: int, d: int, dtype, device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.T, self.r, self.na, self.d = tokens, rank, num_adapters, d
        self.x = torch.randn(tokens, d, generator=gen, device=device, dtype=dtype)
        self.y = torch.randn(tokens, d, generator=gen, device=device, dtype=dtype)
        self.a = (torch.randn(1, num_adapters, rank, d, generator=gen, device=device) / d**0.5).to(dtype)
        self.b = (torch.randn(num_adapters, d, rank, generator=gen, device=device) / rank**0.5).to(dtype)
        self.ranks = torch.full((1, num_adapters), rank, dtype=torch.int32, device=device)
        self.scales = torch.full((1, num_adapters), 2.0, dtype=torch.float32, device=device)
        self.slots = (torch.arange(tokens, device=device) % num_adapters).to(torch.int32)
        self.seg = segment_tokens(self.slots)
        self.starts = torch.zeros(1, dtype=torch.int32, device=device)
        self.widths = torch.full((1,), d, dtype=torch.int32, device=device)
        self.idx = [(self.slots == i).nonzero()[:, 0] for i in range(num_adapters)]  # PEFT's per-adapter rows

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.x, self.y, self.a, self.b))

    def floor_bytes(self) -> int:
        """x read, A and B of the adapters read, t written and read (fp32), y read and written."""
        elt = self.x.element_size()
        return 3 * elt * self.T * self.d + 2 * elt * self.na * self.r * self.d + 8 * self.T * self.r

    def ours(self) -> None:
        seg = (self.seg.sorted_tokens, self.seg.slots, self.seg.starts, self.seg.lens, self.seg.max_len)
        t = lora_shrink(self.x, self.a, self.ranks, self.scales, *seg)
        lora_expand(self.y, t, self.b, self.ranks, self.starts, self.widths, self.d, *seg)

    def gather_bmm(self) -> None:
        slots = self.slots.long()
        t = torch.bmm(self.a[0][slots], self.x.unsqueeze(2)) * 2.0  # [T, r, 1]
        self.y += torch.bmm(self.b[slots], t).squeeze(2)

    def peft(self) -> None:
        """PEFT's mixed-batch forward: one sub-batch, two linears and a scatter per adapter."""
        for i, rows in enumerate(self.idx):
            sub = self.x[rows]
            self.y[rows] += F.linear(F.linear(sub, self.a[0, i]), self.b[i]) * 2.0

    def error(self) -> float:
        """max |ours - reference| / max |reference delta| on a fresh copy of y."""
        y0 = self.y.clone()
        self.ours()
        ours, self.y = self.y, y0.clone()
        t_ref = lora_shrink_ref(self.x, self.a, self.ranks, self.scales, self.slots)
        ref = lora_expand_ref(y0, t_ref, self.b, self.ranks, self.starts, self.widths, self.slots)
        delta = (ref.float() - y0.float()).abs().max().item()
        return (ours.float() - ref.float()).abs().max().item() / max(delta, 1e-30)


def time_us(fns, graphs: bool) -> float:
    """Median microseconds per call of fns (one per input set, cycled). With graphs: every call is
    captured once into a CUDA graph and replayed, so launch gaps shrink to what the GPU needs."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - start) / len(fns) * 1e6
    for fn in fns:  # warm up: compile, allocate
        fn()
    torch.cuda.synchronize()
    if graphs:
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for fn in fns:
                    fn()
        run = graph.replay
    else:

        def run():
            for fn in fns:
                fn()

    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    us = time_us([lambda: dst.copy_(src)] * 4, graphs=False)
    return 2 * n / (us * 1e-6)


def launches_per_module(device) -> int | None:
    """CUDA kernels one LoRAOps.add launches for a single decode token with one adapter."""
    if device.type != "cuda":
        return None
    ops = LoRAOps("triton", device)
    w = SlotWeights.allocate(2, 16, 4096, [4096], torch.float16, device)
    w.set(0, 0, torch.randn(16, 4096, device=device).half(), torch.randn(4096, 16, device=device).half(), 2.0)
    x, y = torch.randn(1, 4096, device=device).half(), torch.zeros(1, 4096, device=device).half()
    batch = segment_tokens(torch.zeros(1, dtype=torch.int32, device=device))
    ops.add(y, x, w, batch)  # compile first
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.add(y, x, w, batch)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(smoke: bool) -> tuple[list[dict], dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16
    sizes = (
        dict(tokens=[1, 7], ranks=[8], d=64)
        if smoke
        else dict(tokens=[1, 16, 64, 256, 1024], ranks=[8, 16, 64], d=4096)
    )
    bandwidth = copy_bandwidth(device)
    rows = []
    for T in sizes["tokens"]:
        for r in sizes["ranks"]:
            for na in sorted({1, min(8, T), T}):
                probe = Case(T, r, na, sizes["d"], dtype, device)
                n_sets = 1 if smoke else max(1, min(32, ROTATE_BYTES // probe.nbytes))
                sets = [probe] + [Case(T, r, na, sizes["d"], dtype, device, seed=i + 1) for i in range(n_sets - 1)]
                row = dict(tokens=T, rank=r, adapters=na, d=sizes["d"], dtype="fp16", rel_error=probe.error())
                row["ours_graph_us"] = time_us([c.ours for c in sets], graphs=True)
                row["ours_eager_us"] = time_us([c.ours for c in sets], graphs=False)
                row["gather_bmm_us"] = time_us([c.gather_bmm for c in sets], graphs=True)
                row["peft_us"] = time_us([c.peft for c in sets], graphs=False)
                row["floor_us"] = probe.floor_bytes() / bandwidth * 1e6
                row["x_floor"] = row["ours_graph_us"] / row["floor_us"]
                row["vs_gather_bmm"] = row["gather_bmm_us"] / row["ours_graph_us"]
                row["vs_peft"] = row["peft_us"] / row["ours_graph_us"]
                rows.append(row)
                print(
                    " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
                )
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter: no timing meaning)"
    info = dict(
        device=name,
        bandwidth_gb_s=bandwidth / 1e9,
        launches_per_module=launches_per_module(device),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
    )
    return rows, info


def write(rows: list[dict], info: dict, out: Path, commit: str) -> Path:
    date = datetime.date.today().isoformat()
    stem = out / f"kernels-{slug(info['device'])}-{date}"
    write_csv(rows, stem.with_suffix(".csv"))
    target = next((r for r in rows if (r["tokens"], r["rank"], r["adapters"]) == (64, 16, 64)), None)
    lines = [
        "# LoRA shrink + expand kernels",
        "",
        f"- device: {info['device']}; date: {date}; commit: {commit}; torch {info['torch']}, triton {info['triton']}",
        f"- device-to-device copy bandwidth (read + write) measured in this run: {info['bandwidth_gb_s']:.0f} GB/s",
        f"- CUDA kernels per module for a single decode token with one adapter: {info['launches_per_module']}",
        "- times: median microseconds per shrink + expand; ours and gather+bmm replayed from CUDA graphs,"
        " PEFT's path eager (as PEFT runs); inputs cycled across sets larger than L2",
        "",
        "| T | r | adapters | ours (graph) | ours (eager) | gather+bmm | PEFT path | floor | x floor | vs bmm"
        " | vs PEFT | rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['rank']} | {r['adapters']} | {r['ours_graph_us']:.1f} | {r['ours_eager_us']:.1f}"
            f" | {r['gather_bmm_us']:.1f} | {r['peft_us']:.1f} | {r['floor_us']:.2f} | {r['x_floor']:.2f}"
            f" | {r['vs_gather_bmm']:.2f} | {r['vs_peft']:.2f} | {r['rel_error']:.1e} |"
        )
    if target:
        ok = target["x_floor"] <= 2 and target["vs_gather_bmm"] >= 3
        lines += [
            "",
            f"Target (T=64 on 64 adapters, r=16): {target['x_floor']:.2f}x the floor (goal <= 2), "
            f"{target['vs_gather_bmm']:.2f}x faster than gather+bmm (goal >= 3): {'met' if ok else 'NOT met'}.",
        ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


class PagedCase:
    """B sequences of `context` tokens each in a paged cache of shuffled blocks; one query token each."""

    def __init__(self, batch, context, heads, head_dim, dtype, device, block_size: int = 16, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        (num_heads, num_kv_heads), per_seq = heads, -(-context // block_size)
        self.B, self.context, self.heads, self.d, self.block_size = batch, context, heads, head_dim, block_size
        shape = (batch * per_seq, block_size, num_kv_heads, head_dim)
        self.k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        self.v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        self.q = torch.randn(batch, num_heads, head_dim, generator=gen, device=device, dtype=dtype)
        ids = torch.randperm(batch * per_seq, generator=gen, device=device)
        self.table = ids.to(torch.int32).view(batch, per_seq)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.scale = head_dim**-0.5

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def floor_bytes(self) -> int:
        """K and V of every visible token read once; q read and out written."""
        return 2 * self.B * self.context * self.heads[1] * self.d * self.k.element_size() + 2 * self.q.nbytes

    def args(self):
        return self.q, self.k, self.v, self.table, self.seq_lens, self.scale

    def ours(self) -> torch.Tensor:
        return paged_decode_attention(*self.args())

    def reference(self) -> torch.Tensor:
        return paged_decode_attention_ref(*self.args())

    def splits(self) -> int:
        return decode_config(
            self.B, self.heads[1], self.heads[0] // self.heads[1], self.d, self.table.shape[1] * self.block_size,
            self.q.dtype, interpreter=self.q.device.type == "cpu",
        )["NUM_SPLITS"]  # fmt: skip

    def error(self) -> float:
        """max |ours - reference| / max |reference|."""
        ours, ref = self.ours().float(), self.reference().float()
        return (ours - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def run_paged(smoke: bool, bandwidth: float) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = (
        dict(batches=[2], contexts=[40], heads=(4, 2), d=64, dtypes=[torch.float16])
        if smoke
        else dict(batches=[1, 32, 128], contexts=[512, 4096, 32768], heads=(32, 8), d=128,
                  dtypes=[torch.float16, torch.bfloat16])
    )  # fmt: skip
    rows = []
    for dtype in sizes["dtypes"]:
        for B in sizes["batches"]:
            for n in sizes["contexts"]:
                probe = PagedCase(B, n, sizes["heads"], sizes["d"], dtype, device)
                n_sets = 1 if smoke else max(1, min(32, ROTATE_BYTES // probe.nbytes))
                sets = [probe] + [PagedCase(B, n, sizes["heads"], sizes["d"], dtype, device, seed=i + 1)
                                  for i in range(n_sets - 1)]  # fmt: skip
                row = dict(batch=B, context=n, heads="/".join(map(str, sizes["heads"])), d=sizes["d"],
                           dtype=str(dtype).removeprefix("torch."), block=probe.block_size, splits=probe.splits(),
                           rel_error=probe.error())  # fmt: skip
                row["ours_graph_us"] = time_us([c.ours for c in sets], graphs=True)
                row["ours_eager_us"] = time_us([c.ours for c in sets], graphs=False)
                row["reference_us"] = time_us([c.reference for c in sets[:4]], graphs=False)
                row["floor_us"] = probe.floor_bytes() / bandwidth * 1e6
                row["x_floor"] = row["ours_graph_us"] / row["floor_us"]
                row["gb_s"] = probe.floor_bytes() / (row["ours_graph_us"] * 1e-6) / 1e9
                row["vs_reference"] = row["reference_us"] / row["ours_graph_us"]
                rows.append(row)
                print(
                    " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
                )
                del probe, sets
    return rows


def write_paged(rows: list[dict], info: dict, out: Path, commit: str) -> Path:
    date = datetime.date.today().isoformat()
    stem = out / f"paged-attention-{slug(info['device'])}-{date}"
    write_csv(rows, stem.with_suffix(".csv"))
    lines = [
        "# Paged decode attention",
        "",
        f"- device: {info['device']}; date: {date}; commit: {commit}; torch {info['torch']}, triton {info['triton']}",
        f"- device-to-device copy bandwidth (read + write) measured in this run: {info['bandwidth_gb_s']:.0f} GB/s;"
        " the floor: K/V of every visible token (+ q, out) at that bandwidth",
        "- times: median microseconds per call; ours replayed from CUDA graphs (and eager), the torch reference"
        " (gather, fp32 math, sequence by sequence) eager; inputs cycled across sets larger than L2",
        "",
        "| B | context | Hq/Hkv | D | dtype | splits | ours (graph) | ours (eager) | reference | floor | x floor"
        " | GB/s | % of copy bw | vs reference | rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['heads']} | {r['d']} | {r['dtype']} | {r['splits']}"
            f" | {r['ours_graph_us']:.1f} | {r['ours_eager_us']:.1f} | {r['reference_us']:.1f} | {r['floor_us']:.2f}"
            f" | {r['x_floor']:.2f} | {r['gb_s']:.0f} | {100 * r['gb_s'] / info['bandwidth_gb_s']:.0f}"
            f" | {r['vs_reference']:.1f} | {r['rel_error']:.1e} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path, times mean nothing")
    a = p.parse_args(argv)
    if not (a.smoke or torch.cuda.is_available()):
        print("no GPU: run with --smoke to check the code path", file=sys.stderr)
        return 2
    rows, info = run(a.smoke)
    stem = write(rows, info, a.out, a.commit)
    print(stem.with_suffix(".md").read_text())
    paged = run_paged(a.smoke, info["bandwidth_gb_s"] * 1e9)
    print(write_paged(paged, info, a.out, a.commit).with_suffix(".md").read_text())
    bad = [r for r in rows + paged if not r["rel_error"] < 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
