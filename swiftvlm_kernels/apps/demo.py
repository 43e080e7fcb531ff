"""`python -m swiftvlm_kernels demo`: vanilla, SwiftVLM, FastV, PDrop and ALVTS on the embedded tiny
LLaVA trained on the synthetic VQA task (swiftvlm_kernels.apps.synth; nothing downloaded). For a few
held-out questions, each method's answer against the truth at one visual-token budget, the prefill
FLOPs against vanilla, and one PNG per method (in --out) with each image and the visual tokens kept
at each stage: kept patches bright, the others faded, the patches the answer depends on outlined (the
SwiftVLM paper's Fig. 6 style). ALVTS (with the model's calibrated selector) keeps its own tokens at
every layer from 2 on: its picture has a small panel per layer, and one where each patch is as bright
as the share of those layers that kept it.

--random: the former view instead, on the 16-layer tiny LLaVA with random weights: per-stage kept
tokens, FLOPs and greedy output ids for a left-padded batch (random weights answer nothing)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..models.tiny import tiny_inputs, tiny_llava
from ..pruning import FastV, PDrop, SwiftVLM, prefill_flops
from .options import positive, require_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ids(t):
    return " ".join(str(v) for v in t.tolist())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, default=None,
                        help="visual tokens per layer on average, merged ones counted (default: N_v / 3)")
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
    """Held-out samples (split 1): the first of each question type, then the next ones in order."""
    from . import synth

    first: dict = {}
    rest: list = []
    i = 0
    while len(first) < len(synth.KINDS) or len(first) + len(rest) < n:
        s = synth.sample(1, i)
        if s.kind not in first:
            first[s.kind] = (i, s)
        else:
            rest.append((i, s))
        i += 1
    chosen = [first[k] for k in synth.KINDS] + rest
    return sorted(chosen[:n], key=lambda t: t[0])


def _run_trained(args):
    from . import evaluation
    from .figures import kept_tokens_figure, layer_kept_figure
    from .png import write_png
    from .trained import checkpoint_selector, trained_record, trained_tiny_llava

    model = trained_tiny_llava(DTYPES[args.dtype], args.device)
    model.backend = args.backend
    record = trained_record()
    n_vis, text = model.num_visual_tokens, model.text_config
    grid = int(round(n_vis ** 0.5))
    share = (args.budget / n_vis) if args.budget is not None else 1 / 3
    chosen = _pick(args.questions)
    items = [evaluation.synthetic_item(s) for _, s in chosen]
    prompts = evaluation.prompts_for(None, model)
    inputs = evaluation.batch_inputs(items, prompts, model, args.device, DTYPES[args.dtype])
    held = record["held_out"]
    print(f"tiny LLaVA trained on the synthetic VQA task (tools/train_tiny.py, {record['steps']} steps): "
          f"{n_vis} visual tokens, {text.num_hidden_layers} layers, d = {text.hidden_size}, "
          f"{text.num_attention_heads} query / {text.num_key_value_heads} KV heads; held-out accuracy "
          f"{100 * held['accuracy']:.1f}% on {held['n']} questions; {args.device}, {args.dtype}")
    print(f"budget: {100 * share:.0f}% of the visual tokens per layer ({share * n_vis:.1f} of {n_vis})\n")
    for j, (i, s) in enumerate(chosen):
        print(f"  Q{j + 1} (held-out #{i}, {s.kind}): {' '.join(s.question)}   truth: {s.answer}")
    print()
    layers = evaluation.eval_layers(model.num_layers)
    selector = checkpoint_selector()
    n_text = inputs["input_ids"].shape[1] - n_vis
    vanilla_flops = prefill_flops(text, n_text, n_vis).total
    paths = []
    for key in evaluation.METHODS:
        name = evaluation.NAMES[key]
        pruning = None if key == "vanilla" else evaluation.make_method(key, share, layers[key], selector)
        plan = model.plan_for(pruning)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs, pruning=pruning)
        seconds = time.perf_counter() - t0
        pred = out.last_logits.argmax(-1).tolist()
        answers = [prompts.decode([p]) for p in pred]
        right = sum(a == it.answer for a, it in zip(answers, items))
        flops = prefill_flops(text, n_text, n_vis, pruning).total
        stages = ", ".join(f"layer {st.layer}: keep {st.keep}" + (f" + {st.merge} merged" if st.merge else "")
                           for st in plan.stages) if plan else "all tokens"
        if key == "alvts":
            stages = (f"layers {plan.stages[0].layer}-{plan.stages[-1].layer}: each keeps its own "
                      f"{plan.stages[0].keep}; selector: rank {selector.rank}, {selector.record.get('init')}"
                      if selector is not None else "SVD selector")
        print(f"{name}: {right}/{len(items)} right, prefill {100 * flops / vanilla_flops:.0f}% of vanilla's FLOPs ({100 - 100 * flops / vanilla_flops:.0f}% saved), "
              f"{plan.average_visual_tokens() if plan else n_vis:.1f} visual tokens per layer ({stages}), "
              f"{seconds * 1e3:.0f} ms")
        print("  answers: " + " | ".join(f"Q{j + 1} {a}{'' if a == it.answer else ' (x)'}"
                                         for j, (a, it) in enumerate(zip(answers, items))))
        labels = [f"from layer {plan.effective_layer(i)}: {st.keep}" for i, st in enumerate(plan.stages)] if plan else []
        rows = [{"image": it.image, "kept": [k[b] for k in out.kept], "targets": it.boxes,
                 "caption": f"Q{b + 1}: {it.question}  truth {it.answer}, {name}: {answers[b]}"}
                for b, it in enumerate(items)]
        if plan is None:
            labels, rows = ["all tokens"], [dict(r, kept=[torch.arange(n_vis)]) for r in rows]
        title = f"{name} at {100 * share:.0f}% of the visual tokens: kept (bright) per stage"
        if plan is not None and plan.bypass:
            title = f"{name} at {100 * share:.0f}%: kept per stage (rest merged and bypassing)"
        if key == "alvts":
            title = f"{name} at {100 * share:.0f}%: the tokens each layer ran on (the rest skip that layer only)"
            figure = layer_kept_figure(rows, grid, [f"layer {st.layer}: {st.keep}" for st in plan.stages], title)
        else:
            figure = kept_tokens_figure(rows, grid, labels, title)
        paths.append(write_png(Path(args.out) / f"{key}.png", figure))
    print("\npictures (image | tokens kept at each stage; answer patches outlined): " +
          ", ".join(str(p) for p in paths))
    return 0


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
