"""`python -m swiftvlm_kernels demo`: vanilla, SwiftVLM, FastV and PDrop on the embedded tiny LLaVA
(random weights, nothing downloaded): per-stage kept tokens, prefill FLOPs against vanilla, and the
greedy output ids of each."""
from __future__ import annotations

import argparse
import time

import torch

from .pruning import prefill_flops
from .pruning import FastV, PDrop, SwiftVLM
from .models.tiny import tiny_inputs, tiny_llava

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ids(t):
    return " ".join(str(v) for v in t.tolist())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, default=None,
                        help="visual tokens per layer on average, merged ones counted (default: N_v / 3)")
    parser.add_argument("--batch", type=_positive, default=2, help="samples; odd ones are left-padded")
    parser.add_argument("--new-tokens", type=_positive, default=8, help="greedy tokens to generate")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--backend", default=None, choices=("auto", "torch", "cpu", "triton", "cuda"),
                        help="swiftvlm op backend (default: auto)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def run(args) -> int:
    from .__main__ import require_backend

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device: expected a torch device such as cpu or cuda, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    require_backend(args.backend, device.type)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # matrices this small only pay the threads' start-up, on a busy CPU a lot
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swiftvlm_kernels demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _run(args):
    model = tiny_llava(DTYPES[args.dtype], args.device, args.seed)
    model.backend = args.backend
    inputs = tiny_inputs(args.batch, left_pad=2, seed=args.seed, device=args.device)
    n_vis, text = model.num_visual_tokens, model.text_config
    n_text = inputs["input_ids"].shape[1] - n_vis  # sample 0 is unpadded
    starts = (inputs["input_ids"] == model.image_token_id).int().argmax(1).tolist()
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    print(f"tiny LLaVA, random weights (seed {args.seed}): {n_vis} visual tokens, {text.num_hidden_layers} "
          f"LLaMA layers, d = {text.hidden_size}, {text.num_attention_heads} query / "
          f"{text.num_key_value_heads} KV heads; {args.device}, {args.dtype}")
    print(f"batch of {args.batch}: image starts at {starts}, left padding {pads}, {n_text} text tokens in sample 0\n")

    methods = [("vanilla", None), ("SwiftVLM", SwiftVLM(budget=args.budget)), ("FastV", FastV(budget=args.budget)),
               ("PDrop", PDrop(layers=(4, 8, 12), budget=args.budget))]
    vanilla_flops = prefill_flops(text, n_text, n_vis).total
    generated = {}
    for name, pruning in methods:
        plan = model.plan_for(pruning)
        t0 = time.perf_counter()
        out = model(**inputs, pruning=pruning)
        tokens = model.generate(**inputs, pruning=pruning, max_new_tokens=args.new_tokens)
        seconds = time.perf_counter() - t0
        flops = prefill_flops(text, n_text, n_vis, plan).total
        per_layer = plan.average_visual_tokens() if plan else float(n_vis)
        print(f"{name}: {per_layer:.2f} visual tokens per layer, prefill {flops / 1e6:.2f} MFLOPs "
              f"({100 * flops / vanilla_flops:.1f}% of vanilla), {out.sequence.h.shape[1]} tokens reach the last "
              f"layer, {seconds * 1e3:.0f} ms")
        for s, (stage, kept) in enumerate(zip(plan.stages if plan else (), out.kept), start=1):
            what = f"merge the rest into {stage.merge}" if stage.merge else "drop the rest"
            print(f"  stage {s}, layer {stage.layer}: keep {stage.keep}, {what}; sample 0 keeps {_ids(kept[0])}")
        generated[name] = tokens

    print(f"\ngreedy output ids ({args.new_tokens} new tokens per sample):")
    for name, tokens in generated.items():
        same = (tokens == generated["vanilla"]).sum().item()
        samples = " | ".join(_ids(row) for row in tokens)
        print(f"  {name:8s} {samples}   ({same}/{tokens.numel()} equal to vanilla)")
    return 0
