"""`python -m swiftvlm_kernels [demo|ops] ...`.

demo   SwiftVLM, FastV and vanilla on the embedded tiny LLaVA (no downloads)
ops    score_select / group_merge / bypass_align on generated LLaVA-1.5-shaped data

Benchmarks run from a source checkout: python -m bench.ops, bench.prefill, bench.host (bench/).
"""
import sys
import time


def ops_demo(argv):
    import torch

    import swiftvlm_kernels as sk

    torch.manual_seed(0)
    B, H, Hkv, D, n_text, n_vis, keep = 2, 32, 32, 128, 74, 576, 192
    L = n_text + n_vis
    q = torch.randn(B, H, D)
    k = torch.randn(B, Hkv, L, D)
    vis_start = torch.tensor([35, 40])  # each sample's image sits at its own position
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :5] = False  # sample 1 is left-padded by 5 tokens
    t0 = time.perf_counter()
    keep_idx, rest_idx, scores = sk.score_select(q, k, vis_start, n_vis, keep, key_mask=mask)
    dt = (time.perf_counter() - t0) * 1e3
    print(f"score_select: B={B}, H={H}, Hkv={Hkv}, D={D}, L={L}, {n_vis} visual tokens -> keep {keep}"
          f" ({dt:.1f} ms on {q.device}, backend {sk.available_backends(q.device.type)[0]!r} by default)")
    for b in range(B):
        print(f"  sample {b}: vis_start={int(vis_start[b])}, first kept {keep_idx[b, :8].tolist()} ..., "
              f"top score {float(scores[b].max()):.5f}, visual mass {float(scores[b].sum()):.3f}")
    h = torch.randn(B, n_vis - keep, 4096)
    merged, group, counts = sk.group_merge(h, 20)
    restored = sk.bypass_align(h, group, merged + 0.5, merged)
    print(f"group_merge: {n_vis - keep} rest tokens -> {merged.shape[1]} merged, group sizes "
          f"{counts[0].tolist()}")
    print(f"bypass_align: restored {tuple(restored.shape)}, mean offset {float((restored - h).mean()):.3f} (expected 0.5)")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command == "demo":
        from .demo import main as run
    elif command == "ops":
        run = ops_demo
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
