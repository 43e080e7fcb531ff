"""Kernel microbenchmarks: every op at the shapes of real models, for every provider.

    python -m bench.ops [--models ...] [--providers ...] [--json out.json]

Providers: eager (python_ref), compile (torch.compile of python_ref), the backends cpu, triton and
cuda, and `naive` for the selection ops: what pruning code often writes instead, a matmul in the input
dtype, softmax, torch.topk and a sort (it rounds the logits to bf16 and breaks ties arbitrarily, so its
selections differ from python_ref's: the yardstick of what exactness costs, not an alternative).
attention_importance runs at each model's full attention (H heads of D) and at the low-rank
selector's one head of rank 128 and 256 (SELECTOR_RANKS); its python_ref materialises [B, H, L, L].
Timing: bench/timer.py (CUDA-graph replay on a GPU; interleaved rounds on a CPU); every
row has p50 / p20 / p80 µs, GB/s and the fraction of the copy bandwidth measured in the same run,
its difference from python_ref, and the machine, versions and commit.
"""
import argparse
import dataclasses
import json
import sys

import torch

import python_ref
from bench.timer import copy_bandwidth, environment, measure
from swiftvlm_kernels import _backend, schemas

# Shapes of real models. n_text: the non-visual tokens of a typical prompt.
MODELS = {
    "llava-1.5-7b": dict(n_vis=576, n_text=74, H=32, Hkv=32, D=128, d=4096),
    "llava-next-7b": dict(n_vis=2880, n_text=74, H=32, Hkv=32, D=128, d=4096),
    "qwen2-vl-7b": dict(n_vis=1296, n_text=74, H=28, Hkv=4, D=128, d=3584),
    "video-16k": dict(n_vis=16384, n_text=74, H=32, Hkv=32, D=128, d=4096),
    # tiny shapes for CPU smoke runs (tests, CI)
    "smoke": dict(n_vis=40, n_text=9, H=4, Hkv=2, D=16, d=32),
}
KEEP_DIVISORS = (3.0, 4.5)  # keep = n_vis / 3 and n_vis / 4.5
# attention_importance is timed at the layer's H heads of D and at the low-rank selector's one head of
# these ranks (ALVTS scores with both)
SELECTOR_RANKS = (128, 256)
# attention_importance's differences are measured against python_ref up to this many bytes of its
# [B, H, L, L] fp32 logits, beyond against the cpu backend (python_ref's arithmetic a block of rows at a
# time, on any device)
REFERENCE_LOGITS_BYTES = 2 ** 30
MERGE_RATIO = 0.05  # Z = 5% of the rest
# the ops in their padded form (the packed varlen ops are timed through bench.ragged)
OPS = tuple(op for op in schemas.OPS if "cu_seqlens" not in schemas.SIGNATURES[op].names)
PROVIDERS = ("eager", "compile", "cpu", "triton", "cuda", "naive")


def _naive_topk(scores, k):
    keep = torch.topk(scores, k, dim=1).indices.sort(1).values
    return keep, keep  # no rest list: the naive form only keeps


def _naive_score_select(q, k, vis_start, vis_len, keep, scale, key_mask=None):
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    logits = torch.matmul(q.view(B, Hkv, H // Hkv, D), k.transpose(-1, -2)).view(B, H, L) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).mean(1)
    scores = probs.gather(1, vis_start[:, None] + torch.arange(vis_len, device=q.device))
    idx = _naive_topk(scores, keep)[0]
    return idx, idx, scores


NAIVE = {"topk_select": _naive_topk, "score_select": _naive_score_select}


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    batch: int
    n_vis: int
    n_text: int
    H: int
    Hkv: int
    D: int
    d: int
    keep: int
    merge: int
    rank: int = 0  # attention_importance: 0 = the layer's H heads of D; else one head of this rank

    @property
    def L(self):
        return self.n_vis + self.n_text

    @property
    def rest(self):
        return self.n_vis - self.keep


def cases(models, batches):
    out = []
    for name in models:
        m = MODELS[name]
        for batch in batches:
            for div in KEEP_DIVISORS:
                keep = round(m["n_vis"] / div)
                merge = max(1, round(MERGE_RATIO * (m["n_vis"] - keep)))
                out.append(Case(name, batch, keep=keep, merge=merge, **m))
    return out


def op_cases(op, case):
    """The cases `op` is timed at for one model case: attention_importance at the layer's heads and at
    the selector's ranks; every other op at the case itself."""
    if op != "attention_importance":
        return [case]
    return [case] + [dataclasses.replace(case, rank=r) for r in SELECTOR_RANKS]


def importance_heads(case):
    """(H, Hk, E) of attention_importance's q and k for a case."""
    return (1, 1, case.rank) if case.rank else (case.H, case.Hkv, case.D)


def make_inputs(op, case, device, dtype):
    """Arguments of `op` (backend-protocol order) for one case; deterministic."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    B, L = case.batch, case.L
    if op in ("tv_score", "score_select"):
        q, k = randn(B, case.H, case.D), randn(B, case.Hkv, L, case.D)
        vis_start = torch.full((B,), case.n_text // 2, dtype=torch.int64, device=device)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        scale = case.D ** -0.5
        if op == "tv_score":
            return (q, k, vis_start, case.n_vis, scale, mask)
        return (q, k, vis_start, case.n_vis, case.keep, scale, mask)
    if op == "attention_importance":
        H, Hk, E = importance_heads(case)
        q, k = randn(B, H, L, E), randn(B, Hk, L, E)
        vis_start = torch.full((B,), case.n_text // 2, dtype=torch.int64, device=device)
        return (q, k, vis_start, case.n_vis, E ** -0.5, torch.ones(B, L, dtype=torch.bool, device=device))
    if op == "topk_select":
        return (torch.randn(B, case.n_vis, generator=g).to(device), case.keep)
    if op == "group_merge":
        return (randn(B, case.rest, case.d), case.merge)
    if op in ("bypass_align", "bypass_align_into"):
        group = torch.randint(0, case.merge, (B, case.rest), generator=g).to(device)
        args = (randn(B, case.rest, case.d), group, randn(B, case.merge, case.d), randn(B, case.merge, case.d))
        if op == "bypass_align":
            return args
        # restore into the full visual block: the rest tokens' rows among all n_vis
        rows = torch.sort(torch.randperm(case.n_vis, generator=g)[: case.rest]).values.expand(B, -1).to(device)
        return (randn(B, case.n_vis, case.d), rows) + args
    if op in ("compact", "restore"):
        h = randn(B, L, case.d)
        vis_start = torch.full((B,), case.n_text // 2, dtype=torch.int64)
        perm = torch.stack([torch.randperm(case.n_vis, generator=g) for _ in range(B)])
        keep, rest = perm[:, :case.keep].sort(1).values, perm[:, case.keep:].sort(1).values
        if op == "compact":
            return (h, vis_start.to(device), keep.to(device), rest.to(device), case.merge)
        h_new, _, rest_h, merged_rows, inverse = python_ref.compact(h.cpu(), vis_start, keep, rest, case.merge)
        group = torch.randint(0, case.merge, (B, case.rest), generator=g)
        return tuple(t.to(device) for t in (h_new, inverse, vis_start, rest, rest_h, group, merged_rows)) + (
            randn(B, case.merge, case.d),)
    raise ValueError(op)


def bytes_moved(op, case, elem):
    """Minimum bytes an op must move through memory (inputs read once, outputs written once)."""
    B = case.batch
    if op in ("tv_score", "score_select"):
        n = B * (case.Hkv * case.L * case.D + case.H * case.D) * elem + B * case.n_vis * 4 + B * case.L
        return n + (B * case.n_vis * 8 if op == "score_select" else 0)
    if op == "attention_importance":  # q and k once, the mask, two fp32 outputs
        H, Hk, E = importance_heads(case)
        return B * (H + Hk) * case.L * E * elem + B * case.L + 2 * B * case.n_vis * 4
    if op == "topk_select":
        return B * case.n_vis * (4 + 8)
    if op == "group_merge":
        return B * (case.rest * case.d + case.merge * case.d) * elem + B * case.rest * 8 + B * case.merge * 4
    if op in ("bypass_align", "bypass_align_into"):
        return B * (2 * case.rest * case.d + 2 * case.merge * case.d) * elem + B * case.rest * 8 * (1 + (op != "bypass_align"))
    if op == "compact":  # read every row once; write the new sequence (with the Z target rows) and the rest
        n_new = case.L - case.rest + case.merge
        return B * (case.L + n_new + case.rest) * case.d * elem + B * (n_new + case.merge + case.L + case.n_vis) * 8
    if op == "restore":  # read the new sequence, the rest and merged_then once; write all L rows
        n_new = case.L - case.rest + case.merge
        return B * (n_new + case.rest + case.merge + case.L) * case.d * elem + B * (
            case.L + 2 * case.rest + case.merge) * 8
    raise ValueError(op)


def _backend_fn(provider, op, device_type):
    why = _backend.unavailable_reason(provider, device_type)
    if why is not None:
        return None, why
    return getattr(_backend.module(op, device_type, provider), op), None


def get_fn(provider, op, device_type):
    if provider == "naive":
        return (NAIVE[op], None) if op in NAIVE else (None, "no naive form")
    if provider == "eager":
        return getattr(python_ref, op), None
    if provider == "compile":
        return torch.compile(getattr(python_ref, op), dynamic=True), None  # one compile serves every shape
    return _backend_fn(provider, op, device_type)


def reference(op, args):
    """python_ref's function of `op`; for attention_importance beyond REFERENCE_LOGITS_BYTES of logits,
    the cpu backend (the same arithmetic a block of rows at a time: python_ref would not fit)."""
    if op == "attention_importance":
        B, H, L, _ = args[0].shape
        if 4 * B * H * L * L > REFERENCE_LOGITS_BYTES:
            from swiftvlm_kernels import cpu

            return cpu.attention_importance
    return getattr(python_ref, op)


def difference(op, args, fn):
    """How far `fn`'s result is from python_ref's on the same input: the largest absolute difference
    of the float outputs, plus the number of differing entries of the index outputs."""
    def outputs(f):
        a = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]
        out = f(*a)
        return (a[0],) if op == "bypass_align_into" else (out if isinstance(out, tuple) else (out,))

    worst, mismatched = 0.0, 0
    for got, want in zip(outputs(fn), outputs(reference(op, args))):
        if want.dtype.is_floating_point:
            worst = max(worst, float((got.float() - want.float()).abs().max()) if want.numel() else 0.0)
        else:
            mismatched += int((got != want).sum())
    return worst, mismatched


def unavailable(providers, device_type) -> dict:
    """{provider: why it cannot run on device_type tensors here} for the providers that cannot."""
    why = {p: _backend.unavailable_reason(p, device_type) for p in providers if p in _backend.BACKENDS}
    return {p: reason for p, reason in why.items() if reason}


def run(models=("llava-1.5-7b",), batches=(1, 8), ops=OPS, providers=PROVIDERS, device=None,
        dtype=torch.bfloat16, progress=True, once=False, on_row=None):
    """Benchmark rows (dicts) for every (case, op, provider) that can run here (the others are
    skipped, each with one line saying why). on_row(rows) is called after every row (a partial
    report survives a late failure). once=True runs each only once, untimed (for compute-sanitizer),
    and returns no rows."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device)
    copy_gbps = copy_bandwidth(device)
    for p, why in unavailable(providers, device.type).items():
        if progress:
            print(f"bench.ops: provider {p!r} skipped: {why}", file=sys.stderr)
    # tv_score and attention_importance do not depend on the keep count: timed once per model and batch
    work = [(oc, op, p) for c in cases(models, batches) for op in ops for oc in op_cases(op, c) for p in providers
            if not (op in ("tv_score", "attention_importance") and c.keep != round(c.n_vis / KEEP_DIVISORS[0]))]
    try:
        from tqdm import tqdm

        it = tqdm(work, desc="bench", disable=not progress, file=sys.stderr)
    except ImportError:
        it = work
    rows, fns = [], {}
    elem = torch.finfo(dtype).bits // 8
    for case, op, provider in it:
        if (provider, op) not in fns:
            fns[(provider, op)] = get_fn(provider, op, device.type)
        fn, why = fns[(provider, op)]
        if fn is None:
            continue
        args = make_inputs(op, case, device, dtype)
        if once:
            fn(*args)
            continue
        try:
            max_diff, index_mismatches = difference(op, args, fn) if provider not in ("eager", "naive") else (0.0, 0)
            t = measure({"op": lambda: fn(*args)}, device, rounds=7)["op"]
            p50, p20, p80 = t.median * 1e6, t.p20 * 1e6, t.p80 * 1e6
            timer = "cudagraph" if device.type == "cuda" else "interleaved"
        except Exception as e:  # one failing case must not lose the rest of the report
            rows.append(dict(op=op, provider=provider, error=f"{type(e).__name__}: {e}"[:300],
                             **dataclasses.asdict(case), **env))
        else:
            gbps = bytes_moved(op, case, elem) / (p50 * 1e-6) / 1e9
            rows.append(dict(op=op, provider=provider, timer=timer, dtype=str(dtype).replace("torch.", ""),
                             p50_us=p50, p20_us=p20, p80_us=p80, gbps=gbps, copy_gbps=copy_gbps,
                             frac_copy_bw=gbps / copy_gbps, max_diff=max_diff, index_mismatches=index_mismatches,
                             **dataclasses.asdict(case), **env))
        if on_row is not None:
            on_row(rows)
    if once and device.type == "cuda":
        torch.cuda.synchronize()
    return rows


def op_label(r):
    """The op of a row, with attention_importance's heads: (H x E) or (rank R)."""
    if r["op"] != "attention_importance":
        return r["op"]
    return f"{r['op']} (rank {r['rank']})" if r.get("rank") else f"{r['op']} ({r['H']} x {r['D']})"


def markdown(rows):
    head = ("| model | B | op | keep | Z | provider | p50 µs | p20 µs | p80 µs | GB/s | % copy BW "
            "| max diff vs ref | index mismatches |\n")
    head += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['model']} | {r['batch']} | {op_label(r)} | {r['keep']} | {r['merge']} | {r['provider']} | "
        f"{r['p50_us']:.1f} | {r['p20_us']:.1f} | {r['p80_us']:.1f} | {r['gbps']:.1f} | {100 * r['frac_copy_bw']:.1f} "
        f"| {r['max_diff']:.2e} | {r['index_mismatches']} |\n"
        for r in rows if "error" not in r)
    failed = "".join(f"- FAILED {op_label(r)} / {r['provider']} ({r['model']}, B={r['batch']}, keep={r['keep']}): {r['error']}\n"
                     for r in rows if "error" in r)
    return head + body + ("\n" + failed if failed else "")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__.split("\n")[0])
    on_gpu = torch.cuda.is_available()
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS),
                    default=[m for m in MODELS if m != "smoke"] if on_gpu else ["llava-1.5-7b"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8] if on_gpu else [1])
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS,
                    default=["eager", "compile", "triton", "cuda"] if on_gpu else ["eager", "cpu"])
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--once", action="store_true", help="run every case once, untimed (for compute-sanitizer)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    args = ap.parse_args(argv)
    if not on_gpu:
        torch.set_num_threads(args.threads)
    missing = unavailable(args.providers, "cuda" if on_gpu else "cpu")
    if missing and len(missing) == len(args.providers):
        for p, why in missing.items():
            print(f"python -m bench.ops: error: provider {p!r} is not available here: {why}", file=sys.stderr)
        return 2

    def save(rows):  # rewritten after every row: a late failure loses nothing
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    rows = run(args.models, args.batch, args.ops, args.providers, dtype=getattr(torch, args.dtype), once=args.once,
               on_row=save)
    if args.once:
        print("ran every case once")
        return 0
    if rows:
        r = rows[0]
        print(f"{r['device_name']} ({r['device']}), torch {r['torch']}, triton {r['triton']}, commit {r['commit']}, "
              f"copy bandwidth {r['copy_gbps']:.1f} GB/s")
    print(markdown(rows))
    save(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
