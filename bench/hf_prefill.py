"""End-to-end prefill of transformers' own VLMs patched by `swiftvlm_kernels.hf.apply`: unpruned
against SwiftVLM, FastV, PDrop and ALVTS, at bench.prefill's shapes.

    python -m bench.hf_prefill                       # CPU: LLaVA and Qwen2-VL, TinyLlama-1.1B shapes, bf16
    python -m bench.hf_prefill --family llava --rounds 3

The models: transformers' LlavaForConditionalGeneration with bench.prefill's config and the minimal
forward's random weights (one narrow CLIP layer, 576 visual tokens), and Qwen2VLForConditionalGeneration
with the same language-model shapes (a Qwen2 decoder: q / k / v biases, M-RoPE) and a one-block
vision tower whose 48 x 48 patch grid merges to 576 visual tokens; 74 text tokens either way (the
vision start / end tokens counted as text). Every call asks for the last token's logits only
(`logits_to_keep=1`), as the minimal forward's prefill does.

Each variant is one call of the same model object: `hf.apply(model, method)` then the forward (the
vanilla variant: `hf.apply(model, None)`, the unpatched model). The variants run interleaved
(bench/timer.py, min and median); per row: the speedup against vanilla (medians of the same run),
the speedup the plan's FLOPs predict (flops.prefill_flops at the language model's shapes, Eq. 17-19:
Qwen2's biases and GQA are not in the count, as for the minimal forward), achieved / predicted, the
ops each stage issues beyond the unpatched forward, and the host syncs beyond it -- `in loop`: during
the decoder-layer loop (must be 0), `checks`: the patched path's input checks (`_decoder._host_ids` /
`_layout` copy input_ids to the host once per prefill and check the visual spans there, as the minimal
forward's input checks do).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager

import torch

from bench import prefill
from bench.host import OpCounter, count_ops, stage_ops
from bench.timer import environment, measure
from swiftvlm_kernels import hf
from swiftvlm_kernels.hf import _decoder
from swiftvlm_kernels.models import checkpoint
from swiftvlm_kernels.pruning import prefill_flops
from swiftvlm_kernels.pruning.plan import plan_for_counts

FAMILIES = ("llava", "qwen2_vl")
# Qwen2-VL's special tokens in the LLaVA-extended vocabulary of bench.prefill's configs
Q_IMAGE, Q_VIDEO, Q_START, Q_END = 32000, 32001, 32002, 32003


def text_config(model_name):
    """The language model's config (the defaults filled in) of bench.prefill's `model_name`."""
    return checkpoint.parse_config(prefill.config(model_name))[2]


def qwen2_vl(model_name, dtype, device):
    """A random Qwen2VLForConditionalGeneration: bench.prefill's language-model shapes, one 64-wide vision
    block, 14 px patches, 2 x 2 merge (a 672 px image: 576 visual tokens), sdpa attention."""
    import transformers

    t = prefill.MODELS[model_name]
    D = t["head_dim"]
    text = dict({k: v for k, v in t.items() if k != "head_dim"}, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [D // 8, 3 * D // 16, D // 2 - D // 8 - 3 * D // 16]},
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg = transformers.Qwen2VLConfig(
        text_config=text, vision_config=dict(depth=1, embed_dim=64, hidden_size=t["hidden_size"], num_heads=1,
                                             mlp_ratio=2, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                                             in_channels=3),
        image_token_id=Q_IMAGE, video_token_id=Q_VIDEO, vision_start_token_id=Q_START, vision_end_token_id=Q_END,
        attn_implementation="sdpa", bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    return model.to(dtype).eval()


def qwen_inputs(model_name, batch, device, dtype):
    """74 text tokens around one image of 576 visual tokens (a 48 x 48 patch grid; smoke: 12 x 12, 36)."""
    grid = 12 if model_name == "smoke" else 48
    n_vis = grid * grid // 4
    before = prefill.TEXT_BEFORE - 1  # the vision start token ends the text before the image
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, 32000, (batch, prefill.N_TEXT + n_vis), generator=gen)
    ids[:, before] = Q_START
    ids[:, before + 1:before + 1 + n_vis] = Q_IMAGE
    ids[:, before + 1 + n_vis] = Q_END
    pixels = torch.randn(batch * grid * grid, 3 * 2 * 14 * 14, generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
            "pixel_values": pixels.to(device, dtype), "image_grid_thw": torch.tensor([[1, grid, grid]] * batch),
            "mm_token_type_ids": (ids == Q_IMAGE).int().to(device)}


def llava_inputs(model, batch, device, dtype):
    x = prefill.inputs(model, batch, device, dtype)
    return dict(input_ids=x["input_ids"], pixel_values=x["pixel_values"], attention_mask=x["attention_mask"])


def build(family, model_name, dtype, device):
    """(transformers model, inputs maker(batch), visual tokens per sample, the minimal forward on the same
    weights or None)."""
    if family == "llava":
        minimal = prefill.build(model_name, dtype, device)
        model = prefill.hf_llava(minimal, dtype, device)
        return model, (lambda batch: llava_inputs(minimal, batch, device, dtype)), minimal.num_visual_tokens, minimal
    model = qwen2_vl(model_name, dtype, device)
    n_vis = (12 if model_name == "smoke" else 48) ** 2 // 4
    return model, (lambda batch: qwen_inputs(model_name, batch, device, dtype)), n_vis, None


class Applied:
    """A transformers model called through `hf.apply` as bench.host's counters call a model:
    model(**inputs, pruning=p) patches it with p (None: the unpatched model) and runs the prefill
    (last token's logits); plan_for(p) is the plan the patched path executes."""

    def __init__(self, model, n_vis):
        self.model, self.n_vis = model, n_vis
        self.num_layers = model.config.get_text_config().num_hidden_layers

    def plan_for(self, pruning):
        return None if pruning is None else plan_for_counts(pruning, [self.n_vis], self.num_layers)

    @torch.no_grad()
    def __call__(self, pruning=None, **inputs):
        hf.apply(self.model, pruning)
        return self.model(**inputs, logits_to_keep=1)


@contextmanager
def checks_apart(counter: OpCounter):
    """While active, the patched path's input checks (`_decoder._host_ids`, `_layout`) are counted in
    `counter` instead of the mode that is current when they run."""
    from torch.utils._python_dispatch import _disable_current_modes

    originals = {name: getattr(_decoder, name) for name in ("_host_ids", "_layout")}

    def counted(fn):
        def run(*args, **kwargs):
            with _disable_current_modes(), counter:
                return fn(*args, **kwargs)
        return run
    for name, fn in originals.items():
        setattr(_decoder, name, counted(fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(_decoder, name, fn)


def stage_counts(applied: Applied, inputs, methods) -> dict:
    """Per method: launches beyond the unpatched prefill per stage, host syncs beyond it in the
    layer loop and in the input checks (bench.host's counter)."""
    vanilla = count_ops(lambda: applied(**inputs))
    out = {}
    for name, pruning in methods:
        applied(**inputs, pruning=pruning)  # uncounted: ALVTS' default selector, made once
        with checks_apart(OpCounter()) as checks:
            counter = count_ops(lambda: applied(**inputs, pruning=pruning))
        stages = len(applied.plan_for(pruning).stages)
        out[name] = dict(stages=stages, extra_launches=counter.launches - vanilla.launches,
                         ops_per_stage=(counter.launches - vanilla.launches) / stages,
                         host_syncs=counter.syncs - vanilla.syncs, check_syncs=checks.syncs,
                         check_ops=checks.launches)
    return out


def layer_times(model, family, lengths, device, dtype, rounds, clock) -> dict:
    """Seconds of one decoder layer of `model` (its first, no cache, causal) on n rows, per n of `lengths`
    (interleaved rounds): what a prefill whose layers run on n_1, n_2, ... rows costs in its layers
    alone, at this machine's own throughput for each row count."""
    text = model.model.language_model
    layer = text.layers[0]
    fns = {}
    for n in sorted(set(lengths)):
        h = torch.randn(1, n, text.config.hidden_size, device=device, dtype=dtype, generator=None) * 0.02
        rope_pos, _ = _decoder._positions(text, "qwen" if family.startswith("qwen") else family, h, None, 0)
        tables = text.rotary_emb(h, rope_pos)
        fns[n] = (lambda h=h, tables=tables: layer(h, attention_mask=None, position_embeddings=tables,
                                                    position_ids=None, use_cache=False))
    with torch.no_grad():
        return {n: t.median for n, t in measure(fns, device, rounds=rounds, sample_s=0.0, clock=clock).items()}


def run(family="llava", model_name="tinyllama-1.1b", batches=(1,), budgets=(192, 128), rounds=5,
        dtype=torch.bfloat16, device=None, progress=print, on_row=None, method_names=None, minimal=True,
        clock=time.perf_counter):
    """Rows of path "hf.apply" (and, for LLaVA with minimal=True, of path "minimal": the minimal forward
    on the same weights and inputs, timed in the same rounds)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress(f"building {family} ({model_name}, {dtype}, {device.type})")
    model, make_inputs, n_vis, ours = build(family, model_name, dtype, device)
    ours = ours if minimal else None
    applied = Applied(model, n_vis)
    cfg = text_config(model_name)
    shape = type("Shape", (), dict(num_layers=applied.num_layers, num_visual_tokens=n_vis))
    rows = []
    for batch in batches:
        x = make_inputs(batch)
        todo = prefill.methods(shape, budgets, method_names or prefill.default_methods(device.type))
        fns = {("hf.apply", name, T): (lambda p=p: applied(**x, pruning=p)) for name, T, p in todo}
        methods = [(f"{n}/{T}", p) for n, T, p in todo if p is not None]
        counts = {("hf.apply", k): v for k, v in stage_counts(applied, x, methods).items()}
        if ours is not None:
            fns.update({("minimal", name, T): (lambda p=p: ours(**x, pruning=p)) for name, T, p in todo})
            for r in stage_ops(ours, x, methods):
                counts["minimal", r["method"]] = dict(stages=r["stages"], extra_launches=r["extra_launches"],
                                                      ops_per_stage=r["ops_per_stage"],
                                                      host_syncs=r["syncs_beyond_vanilla"], check_syncs=None)
        progress(f"timing {len(fns)} variants x {rounds} interleaved rounds (B={batch}, {device.type})")
        with torch.no_grad():
            times = measure(fns, device, rounds=rounds, sample_s=0.0, clock=clock)
        vanilla_flops = prefill_flops(cfg, prefill.N_TEXT, n_vis).total
        per_layer = {(name, T): [prefill.N_TEXT + v for v in applied.plan_for(p).visual_tokens_per_layer()]
                     if p is not None else [prefill.N_TEXT + n_vis] * applied.num_layers for name, T, p in todo}
        progress("timing one decoder layer at each row count the plans run on")
        t_layer = layer_times(model, family, [n for ns in per_layer.values() for n in ns], device, dtype, rounds, clock)
        layers_s = {k: batch * sum(t_layer[n] for n in ns) for k, ns in per_layer.items()}
        for path in ("hf.apply", "minimal") if ours is not None else ("hf.apply",):
            base = times[path, "vanilla", None]
            for name, T, pruning in todo:
                t = times[path, name, T]
                plan = applied.plan_for(pruning)
                flops = prefill_flops(cfg, prefill.N_TEXT, n_vis, plan).total
                predicted = vanilla_flops / flops
                row = dict(family=family, path=path, method=name, budget=T, batch=batch, min_ms=t.min * 1e3,
                           median_ms=t.median * 1e3, rounds=t.samples, speedup=base.median / t.median,
                           speedup_of_min=base.min / t.min, flops=flops * batch, predicted_speedup=predicted,
                           achieved_over_predicted=base.median / t.median / predicted,
                           layer_predicted_speedup=layers_s["vanilla", None] / layers_s[name, T])
                row["achieved_over_layer_predicted"] = row["speedup"] / row["layer_predicted_speedup"]
                if pruning is not None:
                    row.update(counts[path, f"{name}/{T}"], avg_visual_tokens=plan.average_visual_tokens())
                rows.append(row)
                progress(f"{path}: {prefill.format_row(row)}")
                if on_row is not None:
                    on_row(rows)
    hf.apply(model, None)
    return rows


def markdown(rows):
    out = ("| model | path | B | method | budget | median ms | min ms | speedup | FLOPs-predicted | achieved / predicted "
           "| speedup of the mins | layer-time-predicted | achieved / layer-time-predicted | ops / stage "
           "| host syncs beyond vanilla | input-check syncs |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        checks = "-" if r.get("check_syncs") is None else r["check_syncs"]  # the minimal forward's run in vanilla too
        extra = (f"{r['ops_per_stage']:.1f} | {r['host_syncs']} | {checks}"
                 if "ops_per_stage" in r else "- | - | -")
        out += (f"| {r['family']} | {r['path']} | {r['batch']} | {prefill.timing_cells(r)} | {r['speedup_of_min']:.2f}x "
                f"| {r['layer_predicted_speedup']:.2f}x | {r['achieved_over_layer_predicted']:.3f} | {extra} |\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.hf_prefill", description=__doc__.split("\n")[0])
    ap.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    args, env = prefill.parse_common(ap, argv)
    rows: list = []

    def save(done):  # rewritten after every row: a late failure loses nothing
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "model": args.model, "dtype": args.dtype, "n_text": prefill.N_TEXT,
                           "clock": args.clock,
                           "rows": rows + done}, f, indent=1)

    for family in args.family:
        rows += run(family, args.model, args.batch, args.budgets, args.rounds, getattr(torch, args.dtype),
                    on_row=save, method_names=args.methods, clock=prefill.CLOCKS[args.clock])
        save([])
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
