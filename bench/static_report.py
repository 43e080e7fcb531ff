"""The static kernel report: what every kernel costs on an sm_90a GPU, derived without one.

    python -m bench.static_report [--out DIR] [--models ...] [--batches 1 8] [--parts ...]

For every op at the benchmark shapes (bench/ops.py MODELS, keep = n_vis / 3, bf16; attention_importance
also at the selector's ranks, and its traffic only at the smaller shapes: IMPORTANCE_TRAFFIC_PAIRS):
- resources of every kernel variant the backends launch there, compiled for sm_90a: registers,
  spilled bytes, shared memory, threads per block, and the occupancy those allow on an H100 (a
  calculation from the per-SM limits below). Triton: the variants recorded from real launches on meta
  tensors (tools/check_triton_compile.py's machinery), compiled with Triton's compiler and ptxas.
  CUDA: every kernel of csrc/ compiled by nvcc to PTX, registers and spills from `ptxas -v`.
- launches and bytes per op: the minimum bytes the op must move (bench/ops.py bytes_moved) against
  the bytes its kernels request and the distinct 32-byte sectors each launch touches (DRAM traffic if
  the L2 catches every re-read within a launch and none across launches). Counted, not estimated: the
  Triton kernels run in the interpreter with their loads and stores counted; the CUDA kernels run in
  the CPU emulation (tests/cuda_emulator.py) built with every global load and store counted.
- a modelled time per op, labelled MODEL: per launch 2.0 us (inside a CUDA graph) plus the larger of
  distinct sector bytes / 3.0 TB/s and waves x load rounds x 0.6 us, where load rounds is the most
  load instructions one program (Triton) issues in sequence, an upper bound on its dependent DRAM
  round trips. A model of the code, not a measurement: bench/gpu_report.sh measures.

Writes DIR/report.md and DIR/report.json (default bench/results/static-<commit>). Every part runs
in its own process (the Triton compile and the interpreter cannot share one).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

from swiftvlm_kernels import schemas
from swiftvlm_kernels._build import TORCH_TARGET_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# H100 SXM: the figures of the model and of the occupancy calculation
SMS = 132
LAUNCH_US = 2.0
HBM_BYTES_PER_US = 3.0e6  # 3.0 TB/s
DRAM_ROUND_TRIP_US = 0.6
REGS_PER_SM = 65536
REG_ALLOC_PER_WARP = 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SECTOR = 32

# the ops in their padded form (the packed varlen ops run the same kernels)
OPS = tuple(op for op in schemas.OPS if "cu_seqlens" not in schemas.SIGNATURES[op].names)
# attention_importance's traffic is counted (interpreter, emulation) only where B H L^2 is at most this
# (LLaVA-1.5 at 32 heads, every selector case but the video's): its O(L^2 E) work would take hours
# there at the larger shapes. Its resources are compiled at every case. Its bytes also say little of its
# time: it is compute-bound, and the MODEL counts bytes and load rounds only.
IMPORTANCE_TRAFFIC_PAIRS = 2 ** 24


def blocks_per_sm(regs: int, warps: int, smem: int) -> int:
    """Resident blocks per SM allowed by registers, warps, shared memory and the block limit."""
    per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_PER_WARP) * REG_ALLOC_PER_WARP
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_warps = MAX_WARPS_PER_SM // warps
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM))


def _cases(models, batches):
    from bench.ops import KEEP_DIVISORS, cases

    return [c for c in cases(models, batches) if c.keep == round(c.n_vis / KEEP_DIVISORS[0])]


def _case_name(c):
    return f"{c.model} B={c.batch}" + (f" rank={c.rank}" if c.rank else "")


def _op_cases(models, batches, traffic=False):
    """(case, op) pairs: every op at every case, attention_importance also at the selector's ranks
    (bench.ops.op_cases); for the traffic parts, attention_importance only up to IMPORTANCE_TRAFFIC_PAIRS."""
    from bench.ops import importance_heads, op_cases

    out = []
    for case in _cases(models, batches):
        for op in OPS:
            for c in op_cases(op, case):
                if traffic and op == "attention_importance" and \
                        c.batch * importance_heads(c)[0] * c.L ** 2 > IMPORTANCE_TRAFFIC_PAIRS:
                    continue
                out.append((c, op))
    return out


# ------------------------------------------------------------------ Triton: compiled resources

def triton_resources(models, batches):
    """One row per (case, op, launch): kernel, grid, num_warps, regs, spills, smem, occupancy."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import check_triton_compile as ctc  # pops TRITON_INTERPRET: compiles for real
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    from swiftvlm_kernels import triton_kernels as tk

    target = ctc.TARGETS[1]  # sm_90a
    compiled, rows = {}, []
    for case, op in _op_cases(models, batches):
        args = _meta_inputs(op, case, torch.bfloat16)
        launches = []

        def record(kernel, *a, grid, warmup, **kw):
            launches.append((kernel, a, kw, grid))

        run, JITFunction.run = JITFunction.run, record
        try:
            getattr(tk, op)(*args)
        finally:
            JITFunction.run = run
        for kernel, a, kw, grid in launches:
            src, options = ctc.specialise(kernel, a, kw, target)
            key = (kernel, tuple(src.signature.items()), str(src.constants), str(options))
            if key not in compiled:
                k = triton.compile(src, target=target, options=options.__dict__)
                regs, st, ld = ctc.ptxas_usage(k.asm["ptx"], target.arch)
                compiled[key] = dict(regs=regs, spill_bytes=st + ld, smem=k.metadata.shared,
                                     warps=options.num_warps)
            res = compiled[key]
            if callable(grid):
                grid = grid(dict(kw, **{p.name: v for p, v in zip(kernel.params, a)}))
            grid = tuple(grid) + (1,) * (3 - len(grid))
            programs = grid[0] * grid[1] * grid[2]
            per_sm = blocks_per_sm(res["regs"], res["warps"], res["smem"])
            rows.append(dict(case=_case_name(case), op=op, kernel=kernel.fn.__name__, grid=list(grid),
                             programs=programs, threads=res["warps"] * 32, **res, blocks_per_sm=per_sm,
                             occupancy=per_sm * res["warps"] / MAX_WARPS_PER_SM,
                             waves=math.ceil(programs / max(per_sm * SMS, 1))))
    return rows


def _meta_inputs(op, case, dtype):
    """bench/ops.py's inputs of `op` for `case` as meta tensors (shapes, strides, dtypes only)."""
    import torch

    from bench.ops import make_inputs

    small = _small_case(case)
    args = make_inputs(op, small, "cpu", dtype)
    out = []  # each tensor at the real case's shape, with the dtype make_inputs gives it
    for a, shape in zip(args, _shapes(op, case)):
        out.append(torch.empty(shape, dtype=a.dtype, device="meta") if isinstance(a, torch.Tensor) else shape)
    return tuple(out)


def _small_case(case):
    import dataclasses

    return dataclasses.replace(case, batch=1, n_vis=8, n_text=4, H=2, Hkv=1, D=4, d=4, keep=3, merge=2)


def _shapes(op, c):
    """The shapes (or int values) of make_inputs(op, c) without allocating."""
    B, L = c.batch, c.L
    if op == "attention_importance":
        from bench.ops import importance_heads

        H, Hk, E = importance_heads(c)
        return ((B, H, L, E), (B, Hk, L, E), (B,), c.n_vis, E ** -0.5, (B, L))
    if op == "tv_score":
        return ((B, c.H, c.D), (B, c.Hkv, L, c.D), (B,), c.n_vis, c.D ** -0.5, (B, L))
    if op == "score_select":
        return ((B, c.H, c.D), (B, c.Hkv, L, c.D), (B,), c.n_vis, c.keep, c.D ** -0.5, (B, L))
    if op == "topk_select":
        return ((B, c.n_vis), c.keep)
    if op == "group_merge":
        return ((B, c.rest, c.d), c.merge)
    if op == "bypass_align":
        return ((B, c.rest, c.d), (B, c.rest), (B, c.merge, c.d), (B, c.merge, c.d))
    if op == "bypass_align_into":
        return ((B, c.n_vis, c.d), (B, c.rest), (B, c.rest, c.d), (B, c.rest), (B, c.merge, c.d),
                (B, c.merge, c.d))
    if op == "compact":
        return ((B, L, c.d), (B,), (B, c.keep), (B, c.rest), c.merge)
    if op == "restore":
        n_new = L - c.rest + c.merge
        return ((B, n_new, c.d), (B, L), (B,), (B, c.rest), (B, c.rest, c.d), (B, c.rest), (B, c.merge),
                (B, c.merge, c.d))
    raise ValueError(op)


# ------------------------------------------------------------------ Triton: counted traffic

class _Traffic:
    """Counts, per launch, the bytes a kernel's loads and stores request, the distinct 32-byte sectors
    they touch, and the most load instructions one program issues (the interpreter runs one program
    at a time)."""

    def __init__(self):
        self.launches = []
        self._sectors = None

    def begin(self, name, grid):
        self.launches.append(dict(kernel=name, grid=list(grid), requested=0, loads_max=0))
        self._sectors, self._loads = [], 0

    def program(self):
        self.launches[-1]["loads_max"] = max(self.launches[-1]["loads_max"], self._loads)
        self._loads = 0

    def access(self, ptrs, mask, itemsize, load):
        import numpy as np

        addr = np.asarray(ptrs, dtype=np.uint64)[np.asarray(mask, dtype=bool)] if mask is not None else \
            np.asarray(ptrs, dtype=np.uint64).ravel()
        self.launches[-1]["requested"] += int(addr.size) * itemsize
        self._sectors.append(np.unique(addr // SECTOR))
        self._loads += bool(load)

    def end(self):
        import numpy as np

        self.program()
        s = np.unique(np.concatenate(self._sectors)) if self._sectors else np.zeros(0)
        self.launches[-1]["sector_bytes"] = int(s.size) * SECTOR


def triton_traffic(models, batches):
    """One row per (case, op, launch) with the counted traffic of the Triton kernels (interpreter)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import torch
    from triton.runtime import interpreter as ti

    from bench.ops import bytes_moved, make_inputs
    from swiftvlm_kernels import triton_kernels as tk

    counter = _Traffic()
    B = ti.InterpreterBuilder
    orig_load, orig_store, orig_grid = B.create_masked_load, B.create_masked_store, B.set_grid_idx
    orig_rmw = B.create_atomic_rmw

    def load(self, ptrs, mask, other, *a):
        counter.access(ptrs.data, mask.data, np.dtype(ti._get_np_dtype(ptrs.get_element_ty())).itemsize, True)
        return orig_load(self, ptrs, mask, other, *a)

    def store(self, ptrs, value, mask, *a):
        counter.access(ptrs.data, mask.data, np.dtype(ti._get_np_dtype(ptrs.get_element_ty())).itemsize, False)
        return orig_store(self, ptrs, value, mask, *a)

    def rmw(self, op, ptr, val, mask, *a):
        counter.access(ptr.data, mask.data, np.dtype(ti._get_np_dtype(ptr.get_element_ty())).itemsize, True)
        return orig_rmw(self, op, ptr, val, mask, *a)

    def set_grid(self, x, y, z):
        counter.program()
        return orig_grid(self, x, y, z)

    orig_run = ti.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        g = grid(dict(kwargs, **dict(zip(self.arg_names, args)))) if callable(grid) else grid
        counter.begin(self.fn.__name__, tuple(g) + (1,) * (3 - len(g)))
        try:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            counter.end()

    B.create_masked_load, B.create_masked_store, B.set_grid_idx, B.create_atomic_rmw = load, store, set_grid, rmw
    ti.InterpretedFunction.run = run
    rows = []
    try:
        for case, op in _op_cases(models, batches, traffic=True):
            args = make_inputs(op, case, "cpu", torch.bfloat16)
            counter.launches = []
            getattr(tk, op)(*args)
            for launch in counter.launches:
                rows.append(dict(case=_case_name(case), op=op, **launch))
            rows.append(dict(case=_case_name(case), op=op, kernel="(minimum)",
                             min_bytes=bytes_moved(op, case, 2)))
    finally:
        B.create_masked_load, B.create_masked_store, B.set_grid_idx, B.create_atomic_rmw = (
            orig_load, orig_store, orig_grid, orig_rmw)
        ti.InterpretedFunction.run = orig_run
    return rows


# ------------------------------------------------------------------ CUDA: counted traffic (emulation)

def _library_symbols(lib):
    """{"+<offset>": demangled name} of the functions in a shared library (its static symbol table)."""
    out = subprocess.run(["nm", "--defined-only", lib], capture_output=True, text=True).stdout
    names = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            names[f"+{int(parts[0], 16)}"] = parts[2]
    return names


def cuda_traffic(models, batches):
    """One row per (case, op, launch) with the counted global traffic of the CUDA kernels, run in the
    CPU emulation built with every global load and store counted (tests/cuda_emu/traffic.cpp)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import cuda_emulator
    import torch

    from bench.ops import bytes_moved, make_inputs

    lib = cuda_emulator.build(traffic=True)
    backend = cuda_emulator.backend(lib)
    symbols = _library_symbols(lib)
    rows = []
    for case, op in _op_cases(models, batches, traffic=True):
        args = make_inputs(op, case, "cpu", torch.bfloat16)
        for launch in cuda_emulator.count_traffic(lib, lambda: getattr(backend, op)(*args)):
            mangled = symbols.get(launch["kernel"], launch["kernel"])
            launch["kernel"] = _demangle(mangled)
            rows.append(dict(case=_case_name(case), op=op, **launch))
        rows.append(dict(case=_case_name(case), op=op, kernel="(minimum)", min_bytes=bytes_moved(op, case, 2)))
    return rows


# ------------------------------------------------------------------ CUDA: compiled resources

def cuda_resources():
    """One row per CUDA kernel instantiation in csrc/: registers, spills, static shared memory and the
    block size it declares (__launch_bounds__), compiled for sm_90a."""
    import torch.utils.cpp_extension as ext

    rows = []
    includes = [f"-I{p}" for p in ext.include_paths()]
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
            if not name.endswith(".cu"):
                continue
            ptx = os.path.join(tmp, name + ".ptx")
            subprocess.run(["nvcc", "-ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                            f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", f"-I{os.path.join(ROOT, 'csrc')}",
                            *includes, "-arch=compute_90a", os.path.join(ROOT, "csrc", name), "-o", ptx],
                           check=True, capture_output=True)
            text = open(ptx).read()
            threads = {m.group(1): int(m.group(2)) for m in
                       re.finditer(r"\.entry (\S+)\((?:.|\n)*?\.maxntid (\d+)", text)}
            log = subprocess.run(["ptxas", "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
            for block in log.split("Compiling entry function '")[1:]:
                mangled = block.split("'")[0]
                regs = int(re.search(r"Used (\d+) registers", block).group(1))
                st, ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block).groups())
                smem = re.search(r"(\d+) bytes smem", block)
                smem = int(smem.group(1)) if smem else 0
                warps = threads.get(mangled, 1024) // 32
                rows.append(dict(file=f"csrc/{name}", kernel=_demangle(mangled), regs=regs, spill_bytes=st + ld,
                                 static_smem=smem, threads=warps * 32,
                                 blocks_per_sm_static=blocks_per_sm(regs, warps, smem)))
    return rows


def _demangle(name):
    out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    out = re.sub(r"\(anonymous namespace\)::|swiftvlm::", "", out)
    return re.sub(r"\(.*\)$", "", out)


# ------------------------------------------------------------------ the report

def modelled_us(launches):
    """MODEL: per launch 2.0 us + max(sector bytes / 3 TB/s, waves x load rounds x 0.6 us)."""
    total = 0.0
    for la in launches:
        latency = la.get("waves", 1) * la.get("loads_max", 0) * DRAM_ROUND_TRIP_US
        total += LAUNCH_US + max(la["sector_bytes"] / HBM_BYTES_PER_US, latency)
    return total


def _run_part(part, args):
    out = subprocess.run([sys.executable, "-m", "bench.static_report", "--part", part, "--models", *args.models,
                          "--batches", *map(str, args.batches)], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"static_report part {part} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _commit():
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "unknown"


def write_report(data, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(data, f, indent=1)
    lines = [f"# Static kernel report (sm_90a, no GPU) at {data['commit']}", "",
             "Produced by `python -m bench.static_report`; every figure is compiled or counted here, and the",
             "time column is a MODEL (launch 2.0 us + max(sector bytes / 3.0 TB/s, waves x load rounds x 0.6 us)),",
             "not a measurement. " + data["versions"], ""]
    res = data.get("triton_resources", [])
    traffic = data.get("triton_traffic", [])
    if traffic:
        waves = {(r["case"], r["op"], r["kernel"]): r["waves"] for r in res}
        lines += ["## Triton: launches, bytes and modelled time per op", "",
                  "| case | op | launches | min MB | requested MB | sector MB | sector / min | MODEL us |",
                  "|---|---|---|---|---|---|---|---|"]
        for case in dict.fromkeys(r["case"] for r in traffic):
            for op in OPS:
                ls = [r for r in traffic if r["case"] == case and r["op"] == op and r["kernel"] != "(minimum)"]
                mn = [r["min_bytes"] for r in traffic if r["case"] == case and r["op"] == op and "min_bytes" in r]
                if not ls or not mn:
                    continue
                for la in ls:
                    la["waves"] = waves.get((case, op, la["kernel"]), 1)
                req = sum(la["requested"] for la in ls)
                sec = sum(la["sector_bytes"] for la in ls)
                lines.append(f"| {case} | {op} | {len(ls)} | {mn[0] / 1e6:.3f} | {req / 1e6:.3f} | {sec / 1e6:.3f} | "
                             f"{sec / mn[0]:.2f} | {modelled_us(ls):.1f} |")
        lines += ["", "Per launch (the kernels of each op above):", "",
                  "| case | op | kernel | grid | sector MB | load rounds / program | waves |", "|---|---|---|---|---|---|---|"]
        for la in traffic:
            if la["kernel"] != "(minimum)":
                lines.append(f"| {la['case']} | {la['op']} | {la['kernel']} | {'x'.join(map(str, la['grid']))} | "
                             f"{la['sector_bytes'] / 1e6:.3f} | {la['loads_max']} | {la.get('waves', '')} |")
        lines.append("")
    if res:
        lines += ["## Triton kernels at the benchmark shapes (sm_90a)", "",
                  "| case | op | kernel | grid | warps | regs | spill B | smem B | blocks/SM | occupancy | waves |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res:
            lines.append(f"| {r['case']} | {r['op']} | {r['kernel']} | {'x'.join(map(str, r['grid']))} | {r['warps']} | "
                         f"{r['regs']} | {r['spill_bytes']} | {r['smem']} | {r['blocks_per_sm']} | "
                         f"{r['occupancy']:.2f} | {r['waves']} |")
        lines.append("")
    cuda = data.get("cuda_resources", [])
    ctraffic = data.get("cuda_traffic", [])
    if ctraffic:
        per_sm = {r["kernel"]: r["blocks_per_sm_static"] for r in cuda}
        lines += ["## CUDA: launches, bytes and modelled time per op (kernels run in the CPU emulation)", "",
                  "Counted global loads and stores of every launch; load rounds: the most global loads one thread",
                  "issues (an upper bound on its dependent round trips: loads issued together count one each).", "",
                  "| case | op | launches | min MB | requested MB | sector MB | sector / min | MODEL us |",
                  "|---|---|---|---|---|---|---|---|"]
        for case in dict.fromkeys(r["case"] for r in ctraffic):
            for op in OPS:
                ls = [r for r in ctraffic if r["case"] == case and r["op"] == op and r["kernel"] != "(minimum)"]
                mn = [r["min_bytes"] for r in ctraffic if r["case"] == case and r["op"] == op and "min_bytes" in r]
                if not ls or not mn:
                    continue
                for la in ls:
                    la["waves"] = math.ceil(la["blocks"] / (SMS * max(1, per_sm.get(la["kernel"], 1))))
                req = sum(la["read_bytes"] + la["write_bytes"] for la in ls)
                sec = sum(la["sector_bytes"] for la in ls)
                lines.append(f"| {case} | {op} | {len(ls)} | {mn[0] / 1e6:.3f} | {req / 1e6:.3f} | {sec / 1e6:.3f} | "
                             f"{sec / mn[0]:.2f} | {modelled_us(ls):.1f} |")
        lines += ["", "Per launch:", "", "| case | op | kernel | blocks x threads | sector MB | load rounds / thread | waves |",
                  "|---|---|---|---|---|---|---|"]
        for la in ctraffic:
            if la["kernel"] != "(minimum)":
                lines.append(f"| {la['case']} | {la['op']} | `{la['kernel']}` | {la['blocks']} x {la['threads']} | "
                             f"{la['sector_bytes'] / 1e6:.3f} | {la['loads_max']} | {la.get('waves', '')} |")
        lines.append("")
    if cuda:
        lines += ["## CUDA kernels (csrc/, sm_90a)", "",
                  "Blocks per SM from registers, block size and static shared memory; kernels that also take",
                  "dynamic shared memory hold fewer.", "",
                  "| kernel | file | threads | regs | spill B | static smem B | blocks/SM |", "|---|---|---|---|---|---|---|"]
        for r in cuda:
            lines.append(f"| `{r['kernel']}` | {r['file']} | {r['threads']} | {r['regs']} | {r['spill_bytes']} | "
                         f"{r['static_smem']} | {r['blocks_per_sm_static']} |")
        lines.append("")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))


def check_spills(args) -> int:
    """CI: every Triton variant launched at the benchmark shapes and every CUDA kernel, compiled for
    sm_90a, without a spilled byte."""
    spilled = []
    for r in _run_part("triton_resources", args):
        if r["spill_bytes"]:
            spilled.append(f"triton {r['kernel']} [{r['case']} {r['op']}]: {r['spill_bytes']} bytes spilled, {r['regs']} regs")
    for r in _run_part("cuda_resources", args):
        if r["spill_bytes"]:
            spilled.append(f"cuda {r['kernel']} ({r['file']}): {r['spill_bytes']} bytes spilled, {r['regs']} regs")
    print("\n".join(spilled) if spilled else "static_report: no spills (Triton at the benchmark shapes, CUDA kernels)")
    return 1 if spilled else 0


def main(argv=None):
    from bench.ops import MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "smoke"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--parts", nargs="+",
                        default=["triton_resources", "triton_traffic", "cuda_resources", "cuda_traffic"])
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part, print its JSON
    parser.add_argument("--out", default=None)
    parser.add_argument("--check-spills", action="store_true",
                        help="only compile (Triton at the benchmark shapes, all of csrc/): exit 1 if any kernel spills")
    args = parser.parse_args(argv)
    if args.part:
        fn = {"triton_resources": lambda: triton_resources(args.models, args.batches),
              "triton_traffic": lambda: triton_traffic(args.models, args.batches),
              "cuda_resources": cuda_resources,
              "cuda_traffic": lambda: cuda_traffic(args.models, args.batches)}[args.part]
        print(json.dumps(fn()))
        return 0
    if args.check_spills:
        return check_spills(args)
    import torch
    import triton

    data = dict(commit=_commit(), versions=f"torch {torch.__version__}, triton {triton.__version__}, "
                f"{subprocess.run(['nvcc', '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1]}")
    for part in args.parts:
        print(f"static_report: {part} ...", file=sys.stderr, flush=True)
        data[part] = _run_part(part, args)
    out = args.out or os.path.join(ROOT, "bench", "results", f"static-{data['commit']}")
    write_report(data, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
