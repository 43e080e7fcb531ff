"""End-to-end prefill of the minimal LLaVA language model: vanilla, FastV, PDrop and SwiftVLM.

LLaVA-1.5-7B language-model shapes (LLaMA-7B: 32 layers, d = 4096, 32 heads, 650-token prompt with
576 visual tokens) with random bf16 weights, no download. The vision tower is cut to one narrow
layer (same 336 px / 14 px patches, so 576 visual tokens): its cost is negligible, so the time is
the language model's prefill (plus the projector and the LM head, as in any LLaVA prefill).

Each row: p50/p20/p80 ms, speedup against vanilla at the same batch, the share of GPU time spent in
the swiftvlm ops (torch.profiler), and the roofline bound max(weight bytes / copy bandwidth,
FLOPs / matmul rate), both rates measured in the same run.

python -m bench.bench_prefill [--smoke] [--json out.json]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from swiftvlm_kernels import bench as kb  # noqa: E402
from swiftvlm_kernels.flops import prefill_flops  # noqa: E402
from swiftvlm_kernels.llava import LlavaForward  # noqa: E402
from swiftvlm_kernels.pruning import FastV, PDrop, SwiftVLM  # noqa: E402
from swiftvlm_kernels.tiny import tiny_inputs, tiny_llava, tiny_llava_config  # noqa: E402

IMAGE_TOKEN = 32000


def llava15_lm_config():
    """LLaVA-1.5-7B's language model (Vicuna-7B) with a one-layer, 64-wide CLIP stand-in."""
    cfg = tiny_llava_config()
    cfg["image_token_index"] = IMAGE_TOKEN
    cfg["vision_feature_layer"] = -1
    cfg["vision_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                                image_size=336, patch_size=14, projection_dim=64)
    cfg["text_config"].update(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                              max_position_embeddings=4096)
    return cfg


def methods(budgets, smoke):
    """(method, budget, pruning object) rows; PDrop's default layers (8, 16, 24) cannot go below
    144 tokens on 32 layers, so budgets under that use layers (4, 12, 20)."""
    out = [("vanilla", None, None)]
    for T in budgets:
        pdrop_layers = (4, 8, 12) if smoke else (8, 16, 24) if T >= 144 else (4, 12, 20)
        out += [("fastv", T, FastV(budget=T)), ("pdrop", T, PDrop(layers=pdrop_layers, budget=T)),
                ("swiftvlm", T, SwiftVLM(budget=T))]
    return out


def build(smoke, device):
    if smoke:
        return tiny_llava(dtype=torch.float32, device=device), None
    cfg = llava15_lm_config()
    model = LlavaForward.from_config(cfg, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model, cfg


def inputs(model, cfg, batch, device):
    if cfg is None:
        return tiny_inputs(batch, text_len=12, device=device)
    n_vis, L = model.num_visual_tokens, 650
    before = 35
    ids = torch.randint(2, 32000, (batch, L), generator=torch.Generator().manual_seed(batch))
    ids[:, before:before + n_vis] = IMAGE_TOKEN
    px = torch.randn(batch, 3, 336, 336)
    return {"input_ids": ids.to(device), "pixel_values": px.to(device, torch.bfloat16),
            "attention_mask": torch.ones(batch, L, dtype=torch.long, device=device)}


def time_ms(fn, device):
    if device.type == "cuda":
        import triton.testing as tt

        return tuple(tt.do_bench(fn, warmup=50, rep=400, quantiles=[0.5, 0.2, 0.8]))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(samples, dtype=torch.float64)
    return tuple(float(torch.quantile(t, p)) for p in (0.5, 0.2, 0.8))


def prune_share(fn, device):
    """Fraction of device time spent inside swiftvlm ops during one call."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total_attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    ours = sum(getattr(e, total_attr) for e in events if e.key.startswith("swiftvlm::"))
    return ours / total if total else 0.0


def matmul_tflops(device):
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    import triton.testing as tt

    ms = tt.do_bench(lambda: a @ b, warmup=25, rep=200)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def run(smoke, batches, budgets):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = build(smoke, device)
    env = kb.environment(device)
    copy_gbps = kb.copy_bandwidth(device)
    tflops = matmul_tflops(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_vis = model.num_visual_tokens
    rows = []
    for batch in batches:
        x = inputs(model, cfg, batch, device)
        n_text = x["input_ids"].shape[1] - n_vis
        base = None
        for name, budget, pruning in methods(budgets, smoke):
            fn = lambda: model(x["input_ids"], x["pixel_values"], x["attention_mask"], pruning)  # noqa: E731
            p50, p20, p80 = time_ms(fn, device)
            base = p50 if name == "vanilla" else base
            flops = prefill_flops(model.text_config, n_text, n_vis, pruning).total * batch
            bound_ms = None
            if tflops:
                bound_ms = max(weight_bytes / (copy_gbps * 1e9), flops / (tflops * 1e12)) * 1e3
            rows.append(dict(method=name, budget=budget, batch=batch, p50_ms=p50, p20_ms=p20, p80_ms=p80,
                             speedup=base / p50, prune_share=prune_share(fn, device) if pruning else 0.0,
                             flops=flops, roofline_ms=bound_ms, weight_bytes=weight_bytes, copy_gbps=copy_gbps,
                             matmul_tflops=tflops, n_vis=n_vis, n_text=n_text, smoke=smoke, **env))
            print(f"B={batch} {name:8s} T={budget}: {p50:.2f} ms, speedup {base / p50:.2f}x", flush=True)
    return rows


def markdown(rows):
    out = "| B | method | budget | p50 ms | p20 ms | p80 ms | speedup | pruning ops | TFLOP | roofline ms |\n"
    out += "|---|---|---|---|---|---|---|---|---|---|\n"
    for r in rows:
        bound = f"{r['roofline_ms']:.2f}" if r.get("roofline_ms") else "-"
        out += (f"| {r['batch']} | {r['method']} | {r['budget'] or '-'} | {r['p50_ms']:.2f} | {r['p20_ms']:.2f} | "
                f"{r['p80_ms']:.2f} | {r['speedup']:.2f}x | {100 * r['prune_share']:.1f}% | {r['flops'] / 1e12:.2f} | "
                f"{bound} |\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU-friendly (checks the harness)")
    ap.add_argument("--batch", nargs="+", type=int, default=None)
    ap.add_argument("--budgets", nargs="+", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    batches = args.batch or ([1, 2] if args.smoke else [1, 8])
    budgets = args.budgets or ([12, 10] if args.smoke else [192, 128])
    rows = run(args.smoke, batches, budgets)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
