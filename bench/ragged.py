"""A ragged batch against one call per sample: the selection and merging of a pruning stage for 8
samples with their own visual-token counts (LLaVA-NeXT-like, 1,500 to 2,900 after padding removal).

    python -m bench.ragged [--counts 1512 1980 ...] [--provider cpu] [--rounds 3] [--json out.json]

Variants, on the same data:
  ragged   one call of each op in its ragged form (int tensor counts, padded widths): score_select,
           then group_merge of each sample's rest;
  singles  the same ops called once per sample, on that sample alone (its own sequence length).
Per variant: op calls and launches (counted with a TorchDispatchMode: each op a kernel launch on a
GPU), the time on this machine (interleaved rounds, 1 thread, min and median), and a MODEL of the GPU
time (not a measurement): launches x 2 us (in a CUDA graph) or x 5 us (eager launches) + the bytes the
kernels must move / 3 TB/s. The ragged form reads the padded batch (every sample's keys padded to the
longest); the singles read each sample's own.
Shapes: LLaVA-NeXT-7B's language model (H = Hkv = 32, D = 128, d = 4096), 74 text tokens, bf16;
keep = round(n / 3), Z = round(0.05 (n - keep)).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.host import count_ops
from bench.timer import environment, measure
from swiftvlm_kernels import _backend, ops

COUNTS = (1512, 1980, 2304, 2880, 1728, 2592, 2160, 2736)  # LLaVA-NeXT-like, after padding removal
N_TEXT, H, HKV, D, DIM = 74, 32, 32, 128, 4096
LAUNCH_GRAPH_US, LAUNCH_EAGER_US, HBM_BYTES_PER_US = 2.0, 5.0, 3.0e6  # model constants (H100 SXM)


def make_batch(counts, dtype=torch.bfloat16, device="cpu", seed=0):
    """Per sample: q [1, H, D], k [1, Hkv, L_b, D] (its text around its visual tokens); and the padded
    ragged batch of the same data: the visual block padded to max(counts) with invalid keys."""
    g = torch.Generator().manual_seed(seed)
    before = N_TEXT // 2
    M, B = max(counts), len(counts)
    L = N_TEXT + M
    singles = []
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.zeros(B, HKV, L, D, dtype=dtype)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(counts):
        kb = torch.randn(1, HKV, N_TEXT + n, D, generator=g).to(dtype)
        singles.append(dict(q=q[b:b + 1].to(device), k=kb.to(device), n=n, keep=round(n / 3),
                            vis_start=torch.tensor([before], device=device)))
        k[b, :, :before + n] = kb[0, :, :before + n]
        k[b, :, before + M:] = kb[0, :, before + n:]
        mask[b, :before + n] = True
        mask[b, before + M:] = True
    rest = [n - round(n / 3) for n in counts]
    h_rest = torch.randn(B, M, DIM, generator=g).to(dtype)
    for b, r in enumerate(rest):
        h_rest[b, r:] = 0
        singles[b]["h_rest"] = h_rest[b:b + 1, :r].contiguous().to(device)
        singles[b]["merge"] = max(1, round(0.05 * r))
    ragged = dict(q=q.to(device), k=k.to(device), mask=mask.to(device), vis_start=torch.full((B,), before, device=device),
                  counts=torch.tensor(counts, device=device), keep=torch.tensor([s["keep"] for s in singles], device=device),
                  rest=torch.tensor(rest, device=device), merge=torch.tensor([s["merge"] for s in singles], device=device),
                  h_rest=h_rest.to(device), M=M, K=max(s["keep"] for s in singles),
                  Z=max(s["merge"] for s in singles))
    return ragged, singles


def run_ragged(r):
    keep_idx, rest_idx, _ = ops.score_select(r["q"], r["k"], r["vis_start"], r["counts"], r["keep"], D ** -0.5,
                                             r["mask"], max_vis_len=r["M"], max_keep=r["K"])
    merged = ops.group_merge(r["h_rest"], r["merge"], lengths=r["rest"], max_groups=r["Z"])
    return keep_idx, rest_idx, merged


def run_singles(singles):
    out = []
    for s in singles:
        keep_idx, rest_idx, _ = ops.score_select(s["q"], s["k"], s["vis_start"], s["n"], s["keep"], D ** -0.5)
        out.append((keep_idx, rest_idx, ops.group_merge(s["h_rest"], s["merge"])))
    return out


def modelled_bytes(counts, ragged: bool, elem=2):
    """Bytes the kernels must move (MODEL): keys and queries read once, scores / indices written once,
    the rest tokens read and the merged ones written; the ragged form over the padded widths."""
    widths = [max(counts)] * len(counts) if ragged else list(counts)
    total = 0
    for n in widths:
        L, r = N_TEXT + n, n - round(n / 3)
        z = max(1, round(0.05 * r))
        total += (HKV * L * D + H * D) * elem + L + n * (4 + 8) + (r * DIM + z * DIM) * elem + r * 8 + z * 4
    return total


def check_equal(r_out, s_out):
    """The ragged call gives each sample's single-call results."""
    keep_idx, rest_idx, (merged, group, counts) = r_out
    for b, (k1, r1, (m1, g1, c1)) in enumerate(s_out):
        assert torch.equal(keep_idx[b, :k1.shape[1]], k1[0]) and (keep_idx[b, k1.shape[1]:] == -1).all(), b
        assert torch.equal(rest_idx[b, :r1.shape[1]], r1[0]), b
        assert torch.equal(group[b, :g1.shape[1]], g1[0]) and torch.equal(counts[b, :c1.shape[1]], c1[0]), b
        assert torch.equal(merged[b, :m1.shape[1]], m1[0]), b


def run(counts=COUNTS, provider="cpu", rounds=3, device="cpu"):
    torch.set_num_threads(1)
    ragged, singles = make_batch(counts, device=device)
    with _backend.use_backend(provider):
        check_equal(run_ragged(ragged), run_singles(singles))
    fns = {"ragged": lambda: run_ragged(ragged), "singles": lambda: run_singles(singles)}
    with _backend.use_backend(provider):  # the ops through torch.ops.swiftvlm, as a model calls them
        timing = measure(fns, device, rounds=rounds, sample_s=0)
        counters = {name: count_ops(fn) for name, fn in fns.items()}
    rows = []
    for name, fn in fns.items():
        counter = counters[name]
        swiftvlm = sum(c for n, c in counter.by_name.items() if n.startswith("swiftvlm::"))
        nbytes = modelled_bytes(counts, name == "ragged")
        rows.append(dict(variant=name, samples=len(counts), op_calls=swiftvlm, launches=counter.launches,
                         min_ms=timing[name].min * 1e3, median_ms=timing[name].median * 1e3,
                         model_bytes=nbytes,
                         model_gpu_graph_us=counter.launches * LAUNCH_GRAPH_US + nbytes / HBM_BYTES_PER_US,
                         model_gpu_eager_us=counter.launches * LAUNCH_EAGER_US + nbytes / HBM_BYTES_PER_US,
                         provider=provider, counts=list(counts), **environment(device)))
    return rows


def markdown(rows) -> str:
    out = ["| variant | op calls | launches | CPU min ms | CPU median ms | MODEL bytes (MB) | MODEL GPU us (graph / eager) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['op_calls']} | {r['launches']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | "
                   f"{r['model_bytes'] / 1e6:.1f} | {r['model_gpu_graph_us']:.0f} / {r['model_gpu_eager_us']:.0f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    p.add_argument("--provider", default="cpu", help="backend of every op (cpu, torch, triton, cuda)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if any(n < 3 for n in a.counts):
        p.error("--counts: expected visual-token counts of at least 3")
    rows = run(tuple(a.counts), a.provider, a.rounds, a.device)
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
