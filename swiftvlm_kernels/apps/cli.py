"""`python -m swiftvlm_kernels [demo|eval|calibrate|ops] [options]` (no subcommand: demo).

demo       vanilla, SwiftVLM, FastV, PDrop and ALVTS on the embedded trained tiny LLaVA (no
           downloads): answers, FLOPs and pictures of the kept tokens
eval       accuracy against visual-token budget per method and question type (table, CSV, JSON, PNG)
calibrate  fit ALVTS' selectors to a model's own attention and write them
ops        score_select / group_merge / bypass_align on generated LLaVA-1.5-shaped data

Each subcommand has its own --help. A bad subcommand or option exits 2 with one line; an error while
running prints one line and exits 1 (--debug: the traceback instead). Benchmarks run from a source
checkout: python -m bench.ops, bench.prefill, bench.host (see bench/).
"""
from __future__ import annotations

import argparse
import sys
import time

from .options import backend_name, require_backend

SUBCOMMANDS = ("demo", "eval", "calibrate", "ops")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def ops_demo(args) -> int:
    import torch

    import swiftvlm_kernels as sk

    require_backend(args.backend, "cpu")
    torch.manual_seed(0)
    B, H, Hkv, D, n_text, n_vis, keep = 2, 32, 32, 128, 74, 576, 192
    L = n_text + n_vis
    q = torch.randn(B, H, D)
    k = torch.randn(B, Hkv, L, D)
    vis_start = torch.tensor([35, 40])  # each sample's image sits at its own position
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :5] = False  # sample 1 is left-padded by 5 tokens
    t0 = time.perf_counter()
    keep_idx, rest_idx, scores = sk.score_select(q, k, vis_start, n_vis, keep, key_mask=mask, backend=args.backend)
    dt = (time.perf_counter() - t0) * 1e3
    print(f"score_select: B={B}, H={H}, Hkv={Hkv}, D={D}, L={L}, {n_vis} visual tokens -> keep {keep}"
          f" ({dt:.1f} ms on {q.device}, backend {args.backend or 'auto'})")
    for b in range(B):
        print(f"  sample {b}: vis_start={int(vis_start[b])}, first kept {keep_idx[b, :8].tolist()} ..., "
              f"top score {float(scores[b].max()):.5f}, visual mass {float(scores[b].sum()):.3f}")
    h = torch.randn(B, n_vis - keep, 4096)
    merged, group, counts = sk.group_merge(h, 20, backend=args.backend)
    restored = sk.bypass_align(h, group, merged + 0.5, merged, backend=args.backend)
    print(f"group_merge: {n_vis - keep} rest tokens -> {merged.shape[1]} merged, group sizes {counts[0].tolist()}")
    print(f"bypass_align: restored {tuple(restored.shape)}, mean offset {float((restored - h).mean()):.3f} (expected 0.5)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import calibrate, demo, evaluation

    common = argparse.ArgumentParser(add_help=False)  # --debug before or after the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, print the traceback")
    parser = _Parser(prog="python -m swiftvlm_kernels", description=__doc__.split("\n")[0], parents=[common],
                     epilog="Subcommands: demo (the default), eval, calibrate, ops. `python -m swiftvlm_kernels SUBCOMMAND "
                            "--help`.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,eval,calibrate,ops}", parser_class=_Parser)
    d = sub.add_parser("demo", parents=[common], help="vanilla / SwiftVLM / FastV / PDrop / ALVTS on the tiny LLaVA",
                       description=demo.__doc__)
    demo.add_arguments(d)
    d.set_defaults(run=demo.run)
    e = sub.add_parser("eval", parents=[common], help="accuracy against visual-token budget per method",
                       description=evaluation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluation.add_arguments(e)
    e.set_defaults(run=evaluation.run)
    c = sub.add_parser("calibrate", parents=[common], help="fit ALVTS' selectors to a model's attention",
                       description=calibrate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    calibrate.add_arguments(c)
    c.set_defaults(run=calibrate.run)
    o = sub.add_parser("ops", parents=[common], help="the ops on LLaVA-1.5-shaped data",
                       description="score_select, group_merge and bypass_align on generated LLaVA-1.5-shaped data.")
    o.add_argument("--backend", type=backend_name, default=None, help="auto, torch, cpu, triton or cuda (default: auto)")
    o.set_defaults(run=ops_demo)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    has_subcommand = any(a in SUBCOMMANDS for a in argv)
    if not argv or argv[0].startswith("-") and not has_subcommand and not any(a in ("-h", "--help") for a in argv):
        argv = ["demo", *argv]  # no subcommand: the demo, with its options
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:  # one line for the user; the traceback with --debug
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"python -m swiftvlm_kernels {args.command}: error: {message}\n")
        return 1
