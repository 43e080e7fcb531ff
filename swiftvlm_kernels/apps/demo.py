"""`python -m swiftvlm_kernels demo`: vanilla, SwiftVLM, FastV, PDrop and ALVTS on the embedded tiny
LLaVA trained on the synthetic VQA task (swiftvlm_kernels.apps.synth; nothing downloaded). For a few
held-out questions, each method's answer against the truth at one visual-token budget (--budget: the
share of the visual tokens kept per layer on average, merged ones counted, in (0, 1], as eval's
--budgets; default a third; one that a method cannot spend is refused, before anything runs, with
the range they all can), the prefill FLOPs against vanilla, and one PNG per method (in --out)
with each image and the visual tokens kept at each stage (the SwiftVLM paper's Fig. 6 style). Each
picture carries its legend: kept patches as they are inside an orange frame, the others darkened
and striped (dropped) or dotted (SwiftVLM: merged, averaged into the "+ N merged" tokens its labels
count, and restored at the next stage), the objects the answer is about outlined in white and black
(a count question: the objects it counts). Each stage is labelled with the layers that run on its
tokens, 1-indexed, as the terminal prints them. ALVTS (with the model's calibrated selector) keeps
its own tokens at every layer from 2 on: its picture has a small panel per layer (the others skip
that layer only), and one where each patch is the brighter and more orange the more of those layers
kept it. The pictures' paths are printed relative to the current directory when they lie under it.

--random: the former view instead, on the 16-layer tiny LLaVA with random weights: per-stage kept
tokens, FLOPs and greedy output ids for a left-padded batch (random weights answer nothing)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..models.tiny import tiny_inputs, tiny_llava
from ..pruning import FastV, PDrop, SwiftVLM, prefill_flops
from .options import positive, require_backend, shown_path
from .options import share as share_type

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ids(t):
    return " ".join(str(v) for v in t.tolist())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=share_type, default=None, metavar="SHARE",
                        help="the share of the visual tokens kept per layer on average, merged ones counted, in "
                             "(0, 1], as eval's --budgets take it (default 0.333: a third)")
    parser.add_argument("--questions", type=positive, default=5,
                        help="held-out questions to answer (default 5: one of each type first)")
    parser.add_argument("--out", type=Path, default=Path("swiftvlm-demo"),
                        help="folder for the kept-token pictures (default swiftvlm-demo)")
    parser.add_argument("--random", action="store_true",
                        help="the random-weight tiny LLaVA's stage view instead (no answers, no pictures)")
    parser.add_argument("--batch", type=positive, default=2, help="--random: samples; odd ones are left-padded")
    parser.add_argument("--new-tokens", type=positive, default=8, help="--random: greedy tokens to generate")
    parser.add_argument("--seed", type=int, default=0, help="--random: weights and inputs seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--backend", default=None, choices=("auto", "torch", "cpu", "triton", "cuda"),
                        help="swiftvlm op backend (default: auto)")


def run(args) -> int:
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
        return _run(args) if args.random else _run_trained(args)
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swiftvlm_kernels demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _pick(n: int) -> list:
    """Held-out samples (split 1): the first of each question type (of count, the first whose answer is
    not zero, so that its picture outlines what it counts), then the next ones in order."""
    from . import synth

    first: dict = {}
    rest: list = []
    i = 0
    while len(first) < len(synth.KINDS) or len(first) + len(rest) < n:
        s = synth.sample(1, i)
        if s.kind not in first and not (s.kind == "count" and s.answer == "zero"):
            first[s.kind] = (i, s)
        else:
            rest.append((i, s))
        i += 1
    chosen = [first[k] for k in synth.KINDS] + rest
    return sorted(chosen[:n], key=lambda t: t[0])


def stage_spans(plan, num_layers: int) -> list[str]:
    """Per stage of `plan`, the layers that run on its tokens and what they are, e.g. "layers 4-5: 27
    kept + 6 merged" (1-indexed, as the terminal and the pictures both say it): a stage acting after
    its layer (the first, and every drop-only one) takes effect from the next layer; a SwiftVLM stage
    from the second on acts before its layer; an ALVTS stage runs its own layer only."""
    spans = []
    for s, st in enumerate(plan.stages):
        first = plan.effective_layer(s)
        last = first if plan.layer_only(s) else \
            (plan.effective_layer(s + 1) - 1 if s + 1 < len(plan.stages) else num_layers)
        where = f"layer {first}" if first == last else f"layers {first}-{last}"
        spans.append(f"{where}: {st.keep} kept" + (f" + {st.merge} merged" if st.merge else ""))
    return spans


def outlined(s) -> tuple:
    """The pixel boxes the demo outlines for synthetic sample `s`: the cells of the objects its
    question is about, and for a count question the objects it counts (those of the colour asked;
    none when the answer is zero), not every object the model must look at."""
    from . import synth

    if s.kind == "count":
        cells = tuple(o.cell for o in s.objects if o.colour == s.question[-1])
    else:
        cells = s.cells_in_question()
    return tuple((c * synth.CELL, r * synth.CELL, (c + 1) * synth.CELL, (r + 1) * synth.CELL) for r, c in cells)


def title(name: str, share: float, per: str) -> str:
    """Every picture's title: "SwiftVLM, 33% of the visual tokens per layer: kept at each stage"."""
    return f"{name}, {100 * share:.0f}% of the visual tokens per layer: kept at each {per}"


def check_budget(model, share: float, names, build: Callable[[str, float], object]) -> None:
    """ValueError naming --budget when a method of `names` cannot spend `share` on `model` (build(name,
    share) makes its pruning object): the first stage's layers run every visual token, so a budget
    has a floor, and a drop-only method whose stages keep ever fewer has a ceiling. The message gives
    the range every one of the methods can spend (found by bisection from a third, which all can)."""
    def fits(name, value):
        try:
            model.plan_for(build(name, value))
            return True
        except ValueError:
            return False

    failed = [n for n in names if not fits(n, share)]
    if not failed:
        return

    def bound(name, fit, unfit):  # the edge of what `name` can spend, between a share that fits and one that does not
        for _ in range(30):
            mid = (fit + unfit) / 2
            fit, unfit = (mid, unfit) if fits(name, mid) else (fit, mid)
        return fit

    low = max(bound(n, 1 / 3, 0.0) for n in names)
    high = min(1.0 if fits(n, 1.0) else bound(n, 1 / 3, 1.0) for n in names)
    raise ValueError(f"--budget {share:g}: {', '.join(failed)} cannot spend it on this model's {model.num_layers} "
                     f"layers; every method runs from {math.ceil(low * 1e4) / 1e4:.4f} to "
                     f"{math.floor(high * 1e4) / 1e4:.4f}")


TARGET = ("target", "outlined: the answer's objects (count: those counted)")


def _run_trained(args):
    from . import evaluation
    from .figures import DROPPED, MERGED, SKIPPED, kept_tokens_figure, layer_kept_figure
    from .png import write_png
    from .trained import checkpoint_selector, trained_record, trained_tiny_llava

    model = trained_tiny_llava(DTYPES[args.dtype], args.device)
    model.backend = args.backend
    n_vis, text = model.num_visual_tokens, model.text_config
    share = args.budget if args.budget is not None else 1 / 3
    layers = evaluation.eval_layers(model.num_layers)
    selector = checkpoint_selector()

    def method(key):
        return None if key == "vanilla" else evaluation.make_method(key, share, layers[key], selector)

    names = {evaluation.NAMES[k]: k for k in evaluation.METHODS if k != "vanilla"}
    check_budget(model, share, list(names),
                 lambda name, value: evaluation.make_method(names[name], value, layers[names[name]], selector))
    record = trained_record()
    grid = int(round(n_vis ** 0.5))
    chosen = _pick(args.questions)
    items = [evaluation.synthetic_item(s) for _, s in chosen]
    prompts = evaluation.prompts_for(None, model)
    inputs = evaluation.batch_inputs(items, prompts, model, args.device, DTYPES[args.dtype])
    held = record["held_out"]
    print(f"tiny LLaVA trained on the synthetic VQA task (tools/train_tiny.py, {record['steps']} steps): "
          f"{n_vis} visual tokens, {text.num_hidden_layers} layers, d = {text.hidden_size}, "
          f"{text.num_attention_heads} query / {text.num_key_value_heads} KV heads; held-out accuracy "
          f"{100 * held['accuracy']:.1f}% on {held['n']} questions; {args.device}, {args.dtype}")
    print(f"budget: {100 * share:.0f}% of the visual tokens per layer ({share * n_vis:.1f} of {n_vis}; "
          f"--budget {share:.3g})\n")
    for j, (i, s) in enumerate(chosen):
        print(f"  Q{j + 1} (held-out #{i}, {s.kind}): {' '.join(s.question)}   truth: {s.answer}")
    print()
    n_text = inputs["input_ids"].shape[1] - n_vis
    vanilla_flops = prefill_flops(text, n_text, n_vis).total
    paths = []
    for key in evaluation.METHODS:
        name = evaluation.NAMES[key]
        pruning = method(key)
        plan = model.plan_for(pruning)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs, pruning=pruning)
        seconds = time.perf_counter() - t0
        pred = out.last_logits.argmax(-1).tolist()
        answers = [prompts.decode([p]) for p in pred]
        right = sum(a == it.answer for a, it in zip(answers, items))
        flops = prefill_flops(text, n_text, n_vis, pruning).total
        spans = stage_spans(plan, model.num_layers) if plan else [f"layers 1-{model.num_layers}: all {n_vis}"]
        stages = "; ".join(spans)
        if key == "alvts":
            stages = (f"layers {plan.stages[0].layer}-{plan.stages[-1].layer}: each keeps its own "
                      f"{plan.stages[0].keep}; selector: rank {selector.rank}, {selector.record.get('init')}"
                      if selector is not None else "SVD selector")
        print(f"{name}: {right}/{len(items)} right, prefill {100 * flops / vanilla_flops:.0f}% of vanilla's FLOPs ({100 - 100 * flops / vanilla_flops:.0f}% saved), "
              f"{plan.average_visual_tokens() if plan else n_vis:.1f} visual tokens per layer ({stages}), "
              f"{seconds * 1e3:.0f} ms")
        print("  answers: " + " | ".join(f"Q{j + 1} {a}{'' if a == it.answer else ' (x)'}"
                                         for j, (a, it) in enumerate(zip(answers, items))))
        rows = [{"image": it.image, "kept": [k[b] for k in out.kept], "targets": outlined(s),
                 "caption": f"Q{b + 1}: {it.question}  truth {it.answer}, {name}: {answers[b]}"
                            + ("  (none of that colour)" if s.kind == "count" and s.answer == "zero" else "")}
                for b, (it, (_, s)) in enumerate(zip(items, chosen))]
        if key == "alvts":
            legend = [("kept", "ran the layer"), (SKIPPED, "skipped that layer only"),
                      ("share", "how often kept: the more, the brighter and more orange"), TARGET]
            figure = layer_kept_figure(rows, grid, [sp.replace(" kept", "") for sp in spans],
                                       title(name, share, "layer"), legend=legend)
        else:
            styles = [MERGED if st.merge else DROPPED for st in plan.stages] if plan else []
            legend = [("kept", "kept")]
            if MERGED in styles:
                legend.append((MERGED, "merged: averaged into the + N merged tokens, restored at the next stage"))
            if DROPPED in styles:
                legend.append((DROPPED, "dropped"))
            legend.append(TARGET)
            if plan is None:
                rows = [dict(r, kept=[torch.arange(n_vis)]) for r in rows]
            figure = kept_tokens_figure(rows, grid, spans, title(name, 1.0 if plan is None else share, "stage"),
                                        legend=legend, styles=styles)
        paths.append(write_png(Path(args.out) / f"{key}.png", figure))
    print("\npictures (image | tokens kept at each stage; answer patches outlined): " +
          ", ".join(shown_path(p) for p in paths))
    return 0


def _run(args):
    model = tiny_llava(DTYPES[args.dtype], args.device, args.seed)
    model.backend = args.backend
    ratio = args.budget  # None: each method's default, a third of the visual tokens
    methods = [("vanilla", None), ("SwiftVLM", SwiftVLM(budget_ratio=ratio)), ("FastV", FastV(budget_ratio=ratio)),
               ("PDrop", PDrop(layers=(4, 8, 12), budget_ratio=ratio))]
    if ratio is not None:
        check_budget(model, ratio, [name for name, p in methods if p is not None],
                     lambda name, value: dataclasses.replace(dict(methods)[name], budget_ratio=value))
    inputs = tiny_inputs(args.batch, left_pad=2, seed=args.seed, device=args.device)
    n_vis, text = model.num_visual_tokens, model.text_config
    n_text = inputs["input_ids"].shape[1] - n_vis  # sample 0 is unpadded
    starts = (inputs["input_ids"] == model.image_token_id).int().argmax(1).tolist()
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    print(f"tiny LLaVA, random weights (seed {args.seed}): {n_vis} visual tokens, {text.num_hidden_layers} "
          f"LLaMA layers, d = {text.hidden_size}, {text.num_attention_heads} query / "
          f"{text.num_key_value_heads} KV heads; {args.device}, {args.dtype}")
    print(f"batch of {args.batch}: image starts at {starts}, left padding {pads}, {n_text} text tokens in sample 0\n")

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
