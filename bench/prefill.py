"""End-to-end prefill of the minimal LLaVA forward: vanilla, FastV, PDrop, SwiftVLM and ALVTS.

    python -m bench.prefill                  # CPU: the TinyLlama-1.1B-shaped decoder, 1 thread, bf16
    python -m bench.prefill --model llava-1.5-7b --batch 1 8     # a GPU: LLaVA-1.5-7B's language model
    python -m bench.prefill --hf             # also HF transformers' LlavaForConditionalGeneration, vanilla

Random weights, no download; the vision tower is one narrow CLIP layer with the real patch grid (336 px,
14 px patches: 576 visual tokens), so the time is the language model's prefill (plus the projector and
the last token's LM head, as in any LLaVA prefill). 74 text tokens (35 before the image).

Each method's prefill is timed over interleaved rounds (bench/timer.py: min and median), and each row
reports: the speedup against vanilla (medians of the same run); the speedup its FLOPs predict (Eq. 17-19,
flops.prefill_flops); achieved / predicted; the pruning steps' share of its prefill (the time inside the
engine's select / restore and the stage inputs' scoring projections, from separate instrumented runs;
ALVTS: its selector's inputs, the input norm its layer reuses included); and the ops each stage issues
beyond the vanilla forward (bench/host.py's counter, noise-free; ALVTS has one stage per selecting
layer, so its ops / stage are ops per layer). The JSON has the machine, thread count, torch version and
commit. `--methods` picks the methods; ALVTS is in the CPU default only until attention_importance has
its GPU kernels (its default selector, an SVD per layer, is made once before the timing).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager

import torch

from bench.host import stage_ops
from bench.timer import environment, measure
from swiftvlm_kernels.models.llava import LlavaForward
from swiftvlm_kernels.models.tiny import tiny_llava_config
from swiftvlm_kernels.pruning import ALVTS, FastV, PDrop, PruningEngine, SwiftVLM, loop, prefill_flops

IMAGE_TOKEN = 32000
N_TEXT, TEXT_BEFORE = 74, 35

# language models (LLaMA layout), random weights; vocabularies as LLaVA extends them (image token 32000)
MODELS = {
    "tinyllama-1.1b": dict(vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=64),
    "llava-1.5-7b": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, head_dim=128),
    # a few seconds on a CPU: checks the harness (tests, CI); 36 visual tokens
    "smoke": dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=16,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
IMAGE_SIZE = {"smoke": 84}  # else 336: 576 visual tokens


def config(name):
    """A llava-hf config: MODELS[name] as the language model, a one-layer 64-wide CLIP stand-in."""
    cfg = tiny_llava_config()
    cfg["image_token_index"] = IMAGE_TOKEN
    cfg["vision_feature_layer"] = -1
    cfg["vision_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                                image_size=IMAGE_SIZE.get(name, 336), patch_size=14, projection_dim=64)
    cfg["text_config"].update(MODELS[name], max_position_embeddings=4096)
    return cfg


def build(name, dtype, device):
    model = LlavaForward.from_config(config(name), dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "layernorm" in pname or "layrnorm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def inputs(model, batch, device, dtype):
    n_vis, size = model.num_visual_tokens, model.image_size
    L = N_TEXT + n_vis
    ids = torch.randint(2, 32000, (batch, L), generator=torch.Generator().manual_seed(batch))
    ids[:, TEXT_BEFORE:TEXT_BEFORE + n_vis] = IMAGE_TOKEN
    return {"input_ids": ids.to(device), "pixel_values": torch.randn(batch, 3, size, size).to(device, dtype),
            "attention_mask": torch.ones(batch, L, dtype=torch.long, device=device)}


def pdrop_layers(num_layers, budget, n_vis):
    """PDrop's layers (8, 16, 24) of 32, scaled to the depth; earlier ones when the budget is below
    what the layers before the first stage already average."""
    for layers in ((num_layers // 4, num_layers // 2, 3 * num_layers // 4), (4, 10, 16), (3, 8, 13), (2, 6, 10)):
        if layers[-1] < num_layers and layers[0] * n_vis / num_layers < budget:
            return layers
    raise ValueError(f"budget: no PDrop schedule reaches {budget} on {num_layers} layers")


METHODS = ("fastv", "pdrop", "swiftvlm", "alvts")
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def default_methods(device_type: str) -> tuple[str, ...]:
    """Every method on a CPU; on a GPU all but ALVTS until attention_importance has its GPU kernels."""
    return METHODS if device_type == "cpu" else METHODS[:3]


def methods(model, budgets, names=METHODS):
    rows = [("vanilla", None, None)]
    for T in budgets:
        make = {"fastv": lambda: FastV(budget=T),
                "pdrop": lambda: PDrop(layers=pdrop_layers(model.num_layers, T, model.num_visual_tokens), budget=T),
                "swiftvlm": lambda: SwiftVLM(budget=T), "alvts": lambda: ALVTS(budget=T)}
        rows += [(name, T, make[name]()) for name in names]
    return rows


@contextmanager
def pruning_timer(model):
    """Accumulate wall time inside the pruning steps: PruningEngine.select / restore and the model's
    scoring inputs of a stage that acts before its layer (norm, keys, last query)."""
    spent = [0.0]
    originals = {}

    def timed(owner, name):
        fn = getattr(owner, name)
        originals[(owner, name)] = fn

        def wrapper(*args, **kwargs):
            if model.lm_head.weight.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if model.lm_head.weight.is_cuda:
                torch.cuda.synchronize()
            spent[0] += time.perf_counter() - t0
            return out
        setattr(owner, name, wrapper)

    timed(PruningEngine, "select")
    timed(PruningEngine, "restore")
    timed(model, "stage_inputs")
    timed(loop, "selector_stage_inputs")
    try:
        yield spent
    finally:
        for (owner, name), fn in originals.items():
            if owner is model:
                delattr(model, name)
            else:
                setattr(owner, name, fn)


def pruning_share(model, x, plan, runs=2):
    """Fraction of the prefill spent in pruning steps (min over runs of spent / total)."""
    best = 1.0
    for _ in range(runs):
        with pruning_timer(model) as spent:
            t0 = time.perf_counter()
            model(**x, pruning=plan)
            total = time.perf_counter() - t0
        best = min(best, spent[0] / total)
    return best


def hf_llava(model, dtype, device):
    """transformers' LlavaForConditionalGeneration with the same config and weights (sdpa attention)."""
    import transformers

    from swiftvlm_kernels.models.checkpoint import canonical_name

    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**model.config))
    hf = hf.to(dtype=dtype, device=device).eval()
    ours = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, p in hf.named_parameters():
            name = canonical_name(key)
            if name in ours:
                p.copy_(ours[name])
    hf.config._attn_implementation = "sdpa"
    return hf


def run(model_name="tinyllama-1.1b", batches=(1,), budgets=(192, 128), rounds=5, dtype=torch.bfloat16,
        device=None, hf=False, progress=print, on_row=None, method_names=None, clock=time.perf_counter):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build(model_name, dtype, device)
    n_vis = model.num_visual_tokens
    rows = []
    for batch in batches:
        x = inputs(model, batch, device, dtype)
        todo = methods(model, budgets, method_names or default_methods(device.type))
        plans = {(name, T): model.plan_for(p) for name, T, p in todo}
        for name, T, p in todo:
            model.selector_for(p, plans[(name, T)])  # ALVTS: its default selector, made once, before any timing
        fns = {f"{name}/{T}": (lambda p=plans[(name, T)]: model(**x, pruning=p)) for name, T, _ in todo}
        if hf:
            other = hf_llava(model, dtype, device)
            args = dict(input_ids=x["input_ids"], pixel_values=x["pixel_values"], attention_mask=x["attention_mask"])
            with torch.no_grad():
                fns["hf/all-logits"] = lambda: other(**args)
                fns["hf/last-logit"] = lambda: other(**args, logits_to_keep=1)
        progress(f"timing {len(fns)} variants x {rounds} interleaved rounds (B={batch}, {device.type})")
        with torch.no_grad():
            times = measure(fns, device, rounds=rounds, sample_s=0.0, clock=clock)
        counts = {r["method"]: r for r in stage_ops(model, x, [(f"{n}/{T}", p) for n, T, p in todo if p])}
        base = times["vanilla/None"]
        vanilla_flops = prefill_flops(model.text_config, N_TEXT, n_vis).total
        for name, T, pruning in todo:
            t = times[f"{name}/{T}"]
            flops = prefill_flops(model.text_config, N_TEXT, n_vis, plans[(name, T)]).total
            predicted = vanilla_flops / flops
            row = dict(method=name, budget=T, batch=batch, min_ms=t.min * 1e3, median_ms=t.median * 1e3,
                       rounds=t.samples, speedup=base.median / t.median, flops=flops * batch,
                       predicted_speedup=predicted, achieved_over_predicted=base.median / t.median / predicted)
            if pruning is not None:
                c = counts[f"{name}/{T}"]
                row.update(prune_share=pruning_share(model, x, plans[(name, T)]),
                           avg_visual_tokens=plans[(name, T)].average_visual_tokens(),
                           ops_per_stage=c["ops_per_stage"], stages=c["stages"], host_syncs=c["syncs_beyond_vanilla"])
            rows.append(row)
            progress(format_row(row))
            if on_row is not None:
                on_row(rows)
        for variant in ("hf/all-logits", "hf/last-logit"):
            if variant in times:
                t = times[variant]
                rows.append(dict(method=variant, budget=None, batch=batch, min_ms=t.min * 1e3,
                                 median_ms=t.median * 1e3, rounds=t.samples,
                                 vanilla_over_hf=base.median / t.median))
                progress(f"B={batch} {variant}: {t.median * 1e3:.0f} ms median; our vanilla / it = "
                         f"{base.median / t.median:.3f}")
    return rows


def format_row(r):
    text = (f"B={r['batch']} {r['method']:8s} T={r['budget']}: median {r['median_ms']:.0f} ms (min {r['min_ms']:.0f}), "
            f"speedup {r['speedup']:.2f}x, predicted {r['predicted_speedup']:.2f}x, "
            f"achieved/predicted {r['achieved_over_predicted']:.3f}")
    if "prune_share" in r:
        text += f", pruning {100 * r['prune_share']:.2f}%, {r['ops_per_stage']:.1f} ops/stage"
    elif "check_syncs" in r:  # bench.hf_prefill's rows
        text += f", {r['ops_per_stage']:.1f} ops/stage, host syncs {r['host_syncs']} (input checks {r['check_syncs']})"
    return text if "family" not in r else f"{r['family']} {text}"


def markdown(rows):
    out = ("| B | method | budget | median ms | min ms | speedup | FLOPs-predicted | achieved / predicted "
           "| pruning share | ops / stage |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        if r["method"].startswith("hf/"):
            out += (f"| {r['batch']} | {r['method']} | - | {r['median_ms']:.0f} | {r['min_ms']:.0f} | "
                    f"vanilla / HF = {r['vanilla_over_hf']:.3f} | | | | |\n")
            continue
        share = f"{100 * r['prune_share']:.2f}%" if "prune_share" in r else "-"
        ops = f"{r['ops_per_stage']:.1f}" if "ops_per_stage" in r else "-"
        out += f"| {r['batch']} | {timing_cells(r)} | {share} | {ops} |\n"
    return out


def timing_cells(r) -> str:
    """A row's method, budget, median, min, speedup, FLOPs-predicted and achieved / predicted cells."""
    return (f"{r['method']} | {r['budget'] or '-'} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['speedup']:.2f}x | "
            f"{r['predicted_speedup']:.2f}x | {r['achieved_over_predicted']:.3f}")


def parse_common(ap, argv=None):
    """The options every end-to-end benchmark here shares (model, batch, budgets, rounds, threads,
    dtype, methods, json) parsed; the CPU thread count set. Returns (args, environment())."""
    on_gpu = torch.cuda.is_available()
    ap.add_argument("--model", choices=sorted(MODELS), default="llava-1.5-7b" if on_gpu else "tinyllama-1.1b")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8] if on_gpu else [1])
    ap.add_argument("--budgets", nargs="+", type=int, default=[192, 128])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (CPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help="pruning methods to time (default: all on a CPU; all but alvts on a GPU)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="CPU: what a sample reads (thread: the calling thread's CPU time, which leaves out the time a "
                         "shared machine runs other work; with --threads 1 every op runs on that thread)")
    ap.add_argument("--json", help="write the rows and the environment here")
    args = ap.parse_args(argv)
    if args.clock == "thread" and (on_gpu or args.threads != 1):
        ap.error("--clock thread: a CPU run on one thread only")
    if not on_gpu:
        torch.set_num_threads(args.threads)
    return args, environment("cuda" if on_gpu else "cpu")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__.split("\n")[0])
    ap.add_argument("--hf", action="store_true", help="also time transformers' LlavaForConditionalGeneration")
    args, env = parse_common(ap, argv)

    def save(rows):  # rewritten after every row: a late failure loses nothing
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "model": args.model, "dtype": args.dtype, "n_text": N_TEXT,
                           "clock": args.clock, "rows": rows}, f, indent=1)

    rows = run(args.model, args.batch, args.budgets, args.rounds, getattr(torch, args.dtype), hf=args.hf,
               on_row=save, method_names=args.methods, clock=CLOCKS[args.clock])
    save(rows)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
