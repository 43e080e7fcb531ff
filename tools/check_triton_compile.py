#!/usr/bin/env python3
"""Compile-checks every Triton kernel of swiftvlm_kernels/triton_kernels for sm_80 and sm_90a, no GPU needed.

The TRITON_INTERPRET interpreter runs the tests on CPU and accepts code that the GPU compiler rejects
(a loop-carried variable that changes dtype in the loop, say). This tool runs the real compiler
(frontend, MLIR passes, LLVM, ptxas) for both targets on every specialisation the backend launches,
so such errors fail CI where no GPU runs.

How the specialisations are found: the tool calls the backend's public functions (tv_score,
topk_select, score_select, group_merge, bypass_align, bypass_align_into, compact, restore,
attention_importance) on "meta" tensors (shapes, strides and
dtypes, no memory) of LLaVA-scale and test shapes in fp32, fp16 and bf16, with JITFunction.run
replaced by a recorder for the duration. Each launch `kernel[grid](*args, **kwargs)` is recorded
instead of run, then specialised as JITFunction.run would for the target (Triton's own binder:
pointer dtypes, ints equal to 1 made constexpr, 16-divisibility hints; constexprs; num_warps) and
compiled with triton.compile. Deriving the signatures from real calls keeps them right by
construction as kernels and their launchers change; hand-written per-kernel signatures would rot
exactly the way this tool is meant to prevent. The cost is reliance on two Triton internals that
JITFunction.run itself uses (create_function_from_signature and JITFunction._pack_args), written
against Triton 3.9. A kernel (a module-level JIT function named *_kernel) that no case launches
fails the check, so a new kernel needs a case in CASES below.

One line per compiled variant: the result, target, kernel, pointer dtypes, constexprs, num_warps,
registers and spills from `ptxas -v`, and the first case that launched it. The ptxas is the one
Triton assembles with for the target (bin/ptxas for sm_80, bin/ptxas-blackwell for sm_90a: the
older one rejects Triton's sm_90a PTX). Exit status 1 on any compile error, failed case or
uncovered kernel, else 0; spills are warnings (some variants spill a few bytes today). Compiles go
to a temporary Triton cache: nothing reused, nothing left behind.

    python tools/check_triton_compile.py             # all variants, one process per core
    python tools/check_triton_compile.py -k topk -v  # the variants of _topk_select_kernel, full errors
"""
import os
import sys
import tempfile

# Before triton is imported: compile (the interpreter would accept what the compiler rejects), into
# a private cache.
os.environ.pop("TRITON_INTERPRET", None)
CACHE_DIR = tempfile.mkdtemp(prefix="check_triton_compile.")
os.environ["TRITON_CACHE_DIR"] = CACHE_DIR

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import multiprocessing  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from swiftvlm_kernels import triton_kernels as tk  # noqa: E402

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


# ------------------------------------------------------------------ cases: calls of the backend

# (B, H, Hkv, L, D, vis_len, masked): LLaVA-1.5 (576 visual + 74 text tokens) and LLaVA-NeXT (2880 + 74)
# with 32 heads or 28 query heads on 4 KV heads, one prompt without a key mask or a padded batch of 8;
# a 16k-token video; then the shapes of tests/test_backends.py (GQA ratios 1, 4, 7; odd L and D; the
# tests pad the B = 3 batches).
TV_SHAPES = [(B, H, Hkv, L, 128, L - 74, B > 1) for B in (1, 8) for H, Hkv in ((32, 32), (28, 4)) for L in (650, 2954)]
TV_SHAPES += [(1, 32, 32, 16458, 128, 16384, True)]
TV_SHAPES += [(3, 7, 7, 83, 33, 40, True), (3, 8, 2, 33, 16, 7, True), (3, 14, 2, 83, 7, 33, True),
              (1, 4, 1, 7, 8, 7, False)]
# (B, N): scores of the visual tokens above; then the test sizes
TOPK_SHAPES = [(B, N) for B in (1, 8) for N in (576, 2880, 16384)] + [(3, N) for N in (1, 7, 33, 83, 1025)]
# (B, R, Z, d): the rest tokens of LLaVA-1.5 (576 - 192 kept) and LLaVA-NeXT (2880 - 960) merged into
# 5% groups at d = 4096 and Qwen2-VL's 3584; then the test shapes
MERGE_SHAPES = [(B, R, Z, d) for B in (1, 8) for R, Z in ((384, 20), (1920, 96)) for d in (4096, 3584)]
MERGE_SHAPES += [(3, R, Z, d) for R, Z, d in ((7, 1, 33), (7, 7, 7), (33, 5, 64), (83, 9, 33), (83, 83, 16))]


def tv_score_cases(dtype):
    for B, H, Hkv, L, D, vis_len, masked in TV_SHAPES:
        yield (f"tv_score B={B} H={H} Hkv={Hkv} L={L} D={D} V={vis_len}{' mask' if masked else ''}", tk.tv_score,
               (meta(B, H, D, dtype=dtype), meta(B, Hkv, L, D, dtype=dtype), meta(B, dtype=torch.int64), vis_len,
                D ** -0.5, meta(B, L, dtype=torch.bool) if masked else None))
    # int32 starts; keys as [B, L, Hkv, 2D] projection output viewed as [B, Hkv, L, D] (nothing unit-strided)
    B, H, Hkv, L, D, vis_len = 3, 7, 7, 83, 33, 40
    yield ("tv_score strided k, int32 vis_start", tk.tv_score,
           (meta(B, H, D, dtype=dtype), meta(B, L, Hkv, 2 * D, dtype=dtype).transpose(1, 2)[..., ::2],
            meta(B, dtype=torch.int32), vis_len, D ** -0.5, meta(B, L, dtype=torch.bool)))


def score_select_cases(dtype):
    """score_select selects in its scoring launch (the SELECT variant of _visual_scores_kernel), keep = V / 3."""
    for B, H, Hkv, L, D, vis_len, masked in TV_SHAPES:
        yield (f"score_select B={B} H={H} Hkv={Hkv} L={L} D={D} V={vis_len}{' mask' if masked else ''}",
               tk.score_select,
               (meta(B, H, D, dtype=dtype), meta(B, Hkv, L, D, dtype=dtype), meta(B, dtype=torch.int64), vis_len,
                vis_len // 3, D ** -0.5, meta(B, L, dtype=torch.bool) if masked else None))


def topk_select_cases(dtype):
    for B, N in TOPK_SHAPES:
        yield f"topk_select B={B} N={N}", tk.topk_select, (meta(B, N, dtype=dtype), N // 3)
    yield "topk_select strided scores", tk.topk_select, (meta(83, 3, dtype=dtype).t(), 27)


def group_merge_cases(dtype):
    # MERGE_SHAPES, then shapes whose time model picks the other tile shapes of the assign kernel
    # (a 16k-token video: 64 x 64; LLaVA-1.5 batch 8: 32 x 32) and d that is no multiple of 16
    shapes = MERGE_SHAPES + [(1, 10923, 546, 4096), (8, 448, 22, 4096), (2, 300, 40, 100)]
    for B, R, Z, d in shapes:
        yield f"group_merge B={B} R={R} Z={Z} d={d}", tk.group_merge, (meta(B, R, d, dtype=dtype), Z)
    yield "group_merge strided h", tk.group_merge, (meta(3, 83, 40, dtype=dtype).transpose(1, 2), 6)


def bypass_align_cases(dtype):
    def inputs(B, R, Z, d, index_dtype=torch.int64):
        return (meta(B, R, d, dtype=dtype), meta(B, R, dtype=index_dtype), meta(B, Z, d, dtype=dtype),
                meta(B, Z, d, dtype=dtype))

    for B, R, Z, d in MERGE_SHAPES:
        yield f"bypass_align B={B} R={R} Z={Z} d={d}", tk.bypass_align, inputs(B, R, Z, d)
        # the LLaVA forward writes the rest tokens back into the [B, N_v, d] visual block
        yield (f"bypass_align_into B={B} R={R} Z={Z} d={d}", tk.bypass_align_into,
               (meta(B, 3 * R, d, dtype=dtype), meta(B, R, dtype=torch.int64), *inputs(B, R, Z, d)))
    yield ("bypass_align_into int32 rows and groups, strided dst", tk.bypass_align_into,
           (meta(3, 83, 50, dtype=dtype).transpose(1, 2), meta(3, 33, dtype=torch.int32),
            *inputs(3, 33, 5, 83, torch.int32)))


# (B, n, d, M, k, Z): a SwiftVLM stage of LLaVA-1.5 (650 tokens, 576 visual, keep 144, merge 22), a
# FastV drop of LLaVA-NeXT, Qwen2-VL's width; then the test shapes (odd d, nothing kept, Z = R)
COMPACT_SHAPES = [(B, 650, 4096, 576, 144, 22) for B in (1, 8)] + [(1, 2954, 4096, 2880, 960, 0),
                                                                   (8, 1370, 3584, 1296, 432, 43)]
COMPACT_SHAPES += [(3, 40, 33, 20, 6, 4), (2, 17, 8, 9, 3, 0), (2, 15, 7, 6, 0, 6)]


def compact_cases(dtype):
    for B, n, d, M, k, Z in COMPACT_SHAPES:
        R = M - k
        yield (f"compact B={B} n={n} d={d} M={M} k={k} Z={Z}", tk.compact,
               (meta(B, n, d, dtype=dtype), meta(B, dtype=torch.int64), meta(B, k, dtype=torch.int64),
                meta(B, R, dtype=torch.int64), Z))
        if Z:
            n_new = n - R + Z
            yield (f"restore B={B} n={n} d={d} M={M} k={k} Z={Z}", tk.restore,
                   (meta(B, n_new, d, dtype=dtype), meta(B, n, dtype=torch.int64), meta(B, dtype=torch.int64),
                    meta(B, R, dtype=torch.int64), meta(B, R, d, dtype=dtype), meta(B, R, dtype=torch.int64),
                    meta(B, Z, dtype=torch.int64), meta(B, Z, d, dtype=dtype)))
    yield ("compact strided h, int32 slots", tk.compact,
           (meta(2, 33, 40, dtype=dtype).transpose(1, 2)[:, ::2], meta(2, dtype=torch.int32),
            meta(2, 4, dtype=torch.int32), meta(2, 7, dtype=torch.int32), 3))


def ragged_cases(dtype):
    """Ragged batches (per-sample counts as int tensors, padded widths): LLaVA-NeXT-like samples of up to
    2880 visual tokens, batch 8, and a small test shape."""
    i64 = torch.int64
    for B, H, Hkv, L, D, W in ((8, 32, 32, 2954, 128, 2880), (8, 28, 4, 1370, 128, 1296), (3, 8, 2, 33, 16, 7)):
        q, k, starts, counts = meta(B, H, D, dtype=dtype), meta(B, Hkv, L, D, dtype=dtype), meta(B, dtype=i64), \
            meta(B, dtype=i64)
        mask = meta(B, L, dtype=torch.bool)
        yield (f"tv_score ragged B={B} H={H} Hkv={Hkv} L={L} W={W}", tk.tv_score,
               (q, k, starts, counts, D ** -0.5, mask, W))
        yield (f"score_select ragged B={B} H={H} Hkv={Hkv} L={L} W={W}", tk.score_select,
               (q, k, starts, counts, meta(B, dtype=i64), D ** -0.5, mask, W, W // 3))
        yield (f"topk_select ragged B={B} N={W}", tk.topk_select,
               (meta(B, W, dtype=dtype), meta(B, dtype=i64), counts, W // 3))
        n, d, K, Z = L, 64 if B == 3 else 4096, W // 3, max(1, W // 30)
        yield (f"compact ragged B={B} n={n} M={W} K={K} Z={Z}", tk.compact,
               (meta(B, n, d, dtype=dtype), starts, meta(B, K, dtype=i64), meta(B, W, dtype=i64), meta(B, dtype=i64),
                Z))


# (B, H, Hk, L, E, vis_len, masked): attention_importance at LLaVA-1.5 (the selector's one head of rank
# 128 or 256, the layer's 32 heads of 128), Qwen2-VL (28 query heads on 4 KV heads) and LLaVA-NeXT (the
# selector), one prompt or a padded batch of 8; then the shapes of tests/test_backends.py (GQA 1, 4, 7
# and 20: two head groups; E from 1 to 256)
IMPORTANCE_SHAPES = [(B, H, Hk, L, E, V, B > 1) for B in (1, 8) for H, Hk, L, E, V in (
    (1, 1, 650, 128, 576), (1, 1, 650, 256, 576), (32, 32, 650, 128, 576), (28, 4, 1370, 128, 1296),
    (1, 1, 2954, 128, 2880))]
IMPORTANCE_SHAPES += [(3, 7, 7, 83, 33, 40, True), (3, 8, 2, 33, 16, 7, True), (2, 14, 2, 30, 5, 12, True),
                      (2, 4, 1, 7, 1, 7, True), (2, 2, 1, 1, 128, 1, True), (1, 2, 1, 130, 256, 70, False),
                      (1, 20, 1, 40, 8, 25, False)]


def attention_importance_cases(dtype):
    for B, H, Hk, L, E, V, masked in IMPORTANCE_SHAPES:
        yield (f"attention_importance B={B} H={H} Hk={Hk} L={L} E={E} V={V}{' mask' if masked else ''}",
               tk.attention_importance,
               (meta(B, H, L, E, dtype=dtype), meta(B, Hk, L, E, dtype=dtype), meta(B, dtype=torch.int64), V,
                E ** -0.5, meta(B, L, dtype=torch.bool) if masked else None))
    # q and k as [B, L, heads, 2E] projection outputs viewed as [B, heads, L, E]; int32 starts; ragged counts
    B, H, Hk, L, E = 2, 6, 3, 37, 12
    yield ("attention_importance strided q and k, int32 vis_start", tk.attention_importance,
           (meta(B, L, H, 2 * E, dtype=dtype).transpose(1, 2)[..., ::2],
            meta(B, L, Hk, 2 * E, dtype=dtype).transpose(1, 2)[..., ::2], meta(B, dtype=torch.int32), 16, 0.3,
            meta(B, 2 * L, dtype=torch.bool)[:, ::2]))
    for B, H, Hk, L, E, W in ((8, 1, 1, 2954, 128, 2880), (8, 28, 4, 1370, 128, 1296), (4, 8, 2, 45, 20, 30)):
        yield (f"attention_importance ragged B={B} H={H} Hk={Hk} L={L} E={E} W={W}", tk.attention_importance,
               (meta(B, H, L, E, dtype=dtype), meta(B, Hk, L, E, dtype=dtype), meta(B, dtype=torch.int64),
                meta(B, dtype=torch.int64), E ** -0.5, meta(B, L, dtype=torch.bool), W))


CASES = (tv_score_cases, score_select_cases, topk_select_cases, group_merge_cases, bypass_align_cases, compact_cases,
         ragged_cases, attention_importance_cases)


# ------------------------------------------------------------------ recording the launches

@contextlib.contextmanager
def recording():
    """Within: each Triton launch appends (kernel, args, kwargs) to the yielded list instead of running."""
    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel, args, kwargs))

    run = JITFunction.run
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


def specialise(kernel, args, kwargs, target):
    """(ASTSource, options) of the launch kernel[grid](*args, **kwargs) on target, as JITFunction.run builds them."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def describe(kernel, src, options):
    """Pointer dtypes, the kernel's declared constexprs and num_warps, for the report line."""
    pointers = []
    for ty in src.signature.values():
        if ty.startswith("*") and ty[1:] not in pointers:
            pointers.append(ty[1:])
    consts = " ".join(f"{p.name}={src.constants[(p.num,)]}" for p in kernel.params if p.is_constexpr)
    return f"{'/'.join(pointers):<16} {consts} warps={options.num_warps}"


def collect():
    """(variants, errors): the distinct (target, kernel, source, options, label, case) and the failed cases.

    Variants are distinct in argument types (ints equal to 1 are constexpr), constexpr values and
    options; the 16-divisibility hints are left out of the key (they only widen vector accesses, and
    would multiply the variants by the shapes): the first case of a variant, a model shape where
    there is one, supplies them.
    """
    variants, errors, seen = [], [], set()
    for cases in CASES:
        for dtype in DTYPES:
            for case, op, args in cases(dtype):
                case = f"{case} {str(dtype).removeprefix('torch.')}"
                with recording() as launches:
                    try:
                        op(*args)
                    except Exception as e:  # a launcher that fails on these inputs is a failure to report
                        errors.append((case, f"{type(e).__name__}: {e}"))
                for target in TARGETS:
                    for kernel, args, kwargs in launches:
                        src, options = specialise(kernel, args, kwargs, target)
                        key = (target.arch, kernel, tuple(src.signature.items()), str(src.constants), str(options))
                        if key not in seen:
                            seen.add(key)
                            variants.append((target, kernel, src, options, describe(kernel, src, options), case))
    return variants, errors


def uncovered(variants):
    """Names of the module-level *_kernel JIT functions of the backend that no case launched."""
    launched = {kernel for _, kernel, *_ in variants}
    missing = []
    for info in pkgutil.iter_modules(tk.__path__):
        module = importlib.import_module(f"{tk.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == module.__name__ \
                    and obj not in launched:
                missing.append(f"{module.__name__}.{name}")
    return missing


# ------------------------------------------------------------------ compiling

VARIANTS = []  # filled before the worker processes fork; they compile by index


def ptxas_usage(ptx, capability):
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the PTX Triton generated."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", dir=CACHE_DIR, delete=False) as f:
        f.write(ptx)
    log = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                          f.name, "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    os.remove(f.name)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, stores, loads


def compile_variant(index):
    """(registers, spill stores, spill loads, shared bytes, seconds, error or None) of VARIANTS[index]."""
    target, _, src, options, _, _ = VARIANTS[index]
    start = time.perf_counter()
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
        usage = ptxas_usage(compiled.asm["ptx"], target.arch)
        return (*usage, compiled.metadata.shared, time.perf_counter() - start, None)
    except Exception as e:  # the compiler's error is the result being checked
        return (0, 0, 0, 0, time.perf_counter() - start, f"{type(e).__name__}: {e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="compile processes (default: one per available core)")
    parser.add_argument("-k", "--kernel", default="", help="only the variants of kernels whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true", help="full compiler errors (default: 30 lines)")
    args = parser.parse_args()
    start = time.perf_counter()

    variants, errors = collect()
    missing = uncovered(variants)
    VARIANTS[:] = [v for v in variants if args.kernel in v[1].fn.__name__]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(compile_variant, range(len(VARIANTS))))

    failed, spilled, max_regs = [], [], {}
    for (target, kernel, _, _, label, case), (regs, stores, loads, shared, seconds, error) in zip(VARIANTS, results):
        arch = sm_arch_from_capability(target.arch)
        name = kernel.fn.__name__
        if error:
            failed.append((f"{arch} {name} {label} [{case}]", error))
            status, usage = "FAIL", "compile error"
        else:
            max_regs[name] = max(max_regs.get(name, 0), regs)
            spilled += [stores + loads] if stores or loads else []
            status = "spill" if stores or loads else "ok"
            usage = f"regs={regs:<3} spills={stores}/{loads}B smem={shared}"
        print(f"{status:<5} {arch:<6} {name:<22} {label:<58} {usage:<36} {seconds:5.1f}s  [{case}]")

    by_error = {}  # one report per distinct error: a kernel error usually breaks all its variants alike
    for what, error in errors + failed:
        by_error.setdefault(error, []).append(what)
    for error, whats in by_error.items():
        lines = error.splitlines()
        more = f"\n     and {len(whats) - 3} more" if len(whats) > 3 else ""
        print("\n---- " + "\n     ".join(whats[:3]) + more + "\n" + "\n".join(lines if args.verbose else lines[:30]))
    for name in missing:
        print(f"\n---- {name} is launched by no case: add one to CASES in {os.path.relpath(__file__)}")
    kernels = {kernel for _, kernel, *_ in VARIANTS}
    print(f"\n{len(VARIANTS)} variants of {len(kernels)} kernels for {len(TARGETS)} targets in "
          f"{time.perf_counter() - start:.0f}s: {len(failed)} compile errors, {len(errors)} failed cases, "
          f"{len(missing)} uncovered kernels")
    if max_regs:
        print("max registers: " + ", ".join(f"{name} {regs}" for name, regs in sorted(max_regs.items())))
    if spilled:  # ptxas spills a few bytes in some variants today: a warning, not a failure
        print(f"warning: {len(spilled)} variants spill (stores + loads up to {max(spilled)} bytes), marked 'spill'")
    return 1 if failed or errors or missing else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(CACHE_DIR, ignore_errors=True)
