"""`python -m swiftvlm_kernels calibrate`: fit ALVTS' selectors to a model's own attention and write them
(selector.json + selector.safetensors, `Selector.load` reads them; pass one to `ALVTS(selector=...)`).

    python -m swiftvlm_kernels calibrate --out DIR [--model CHECKPOINT_DIR] [--data DATASET_DIR]
        [--rank 16] [--samples 512] [--steps 300] [--lr 0.003] [--batch-size 64] [--seed 0]

Each selecting layer's rank-R selector starts from the SVD default and is fitted, the model frozen,
to minimise KL(p* || p) between its importance S = t2v * v2v and the layer's own S* (attention_importance
of its real queries and keys: every head, after RoPE), each normalised over the visual tokens, on unpruned forwards
(swiftvlm_kernels.pruning.calibration has the details). The samples: the first --samples questions of
the synthetic VQA task's calibration split (split 2: neither the training split 0 nor eval's held-out
split 1), or of a dataset folder (--data, eval's format: questions.jsonl and images; answers unused).
A quarter of them (drawn with --seed) is held out: the fit never reads them, and selector.json
records, per layer, the loss before and after, the Spearman rank correlation of S with S* and how
much of S* a top-third selection by S keeps, all on those. The same command, seed and --threads give
byte-identical files.

Checkpoints as for eval: a llava-hf directory (config.json, model.safetensors) prompted with its
vocab.json, or with its Hugging Face tokenizer and the LLaVA-1.5 template. A checkpoint directory's
`alvts-selector/` is the selector eval and the demo give ALVTS on that model (the embedded tiny
LLaVA ships one, made by the command in the README).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from pathlib import Path

import torch

from .options import add_model_and_data, bounded_int, layer_list, positive

CALIBRATION_SPLIT = 2  # synthetic samples that neither training (split 0) nor eval (split 1) reads
DEFAULT_RANK, DEFAULT_SAMPLES = 16, 512


def _learning_rate(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _layers(text: str) -> tuple[int, ...]:
    layers = layer_list(text)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1:
        raise argparse.ArgumentTypeError(f"expected strictly increasing layers >= 1, got {text!r}")
    return layers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..pruning.calibration import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS

    add_model_and_data(parser, "the synthetic task's calibration split")
    parser.add_argument("--rank", type=positive, default=DEFAULT_RANK,
                        help=f"the selectors' rank R, at most the hidden size (default {DEFAULT_RANK})")
    parser.add_argument("--samples", type=bounded_int(4, note=" (a quarter is held out)"), default=DEFAULT_SAMPLES,
                        help=f"calibration samples, a quarter of them held out (default {DEFAULT_SAMPLES})")
    parser.add_argument("--steps", type=positive, default=DEFAULT_STEPS, help=f"Adam steps per layer (default {DEFAULT_STEPS})")
    parser.add_argument("--lr", type=_learning_rate, default=DEFAULT_LR, help=f"Adam's learning rate (default {DEFAULT_LR})")
    parser.add_argument("--batch-size", type=positive, default=DEFAULT_BATCH,
                        help=f"training samples per step (default {DEFAULT_BATCH})")
    parser.add_argument("--seed", type=bounded_int(0, 2 ** 31 - 1), default=0, help="held-out draw and minibatch order (default 0)")
    parser.add_argument("--layers", type=_layers, default=None,
                        help="selecting layers to calibrate, e.g. 2:4:6 (default: ALVTS' default, 2 to the last)")
    parser.add_argument("--threads", type=positive, default=1,
                        help="CPU threads (default 1; byte-identical output needs the same count)")
    parser.add_argument("--out", type=Path, required=True, help="the selector directory to write")


def _model_dir(model_dir):
    from .trained import TRAINED_DIR

    return TRAINED_DIR if model_dir is None else model_dir


def check_options(args) -> dict:
    """Everything the options name, checked before anything is loaded or fitted (ValueError): the
    checkpoint's config, the rank and layers against it, the dataset folder, the output path.
    Returns the text config."""
    from ..models import checkpoint

    path = _model_dir(args.model)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ValueError(f"--model: expected a checkpoint directory with config.json and model.safetensors, got {path}")
    _, _, text = checkpoint.parse_config(checkpoint.read_config(path), str(path / "config.json"))
    if args.rank > text.hidden_size:
        raise ValueError(f"--rank: expected at most the model's hidden size {text.hidden_size}, got {args.rank}")
    if args.layers is not None and args.layers[-1] > text.num_hidden_layers:
        raise ValueError(f"--layers: expected layers in [1, {text.num_hidden_layers}] (the model's), got "
                         f"{':'.join(map(str, args.layers))}")
    if args.data is not None and not (args.data / "questions.jsonl").is_file():
        raise ValueError(f"--data: expected a folder holding questions.jsonl, got {args.data}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out: expected a directory (or a new path), got the file {args.out}")
    return text


def calibration_items(data, n: int) -> list:
    """The first n questions of the synthetic calibration split, or of a dataset folder (ValueError
    when it holds fewer)."""
    from .evaluation import dataset_items, synthetic_items

    if data is None:
        return synthetic_items(n, seed=CALIBRATION_SPLIT)
    items = dataset_items(data, n)
    if len(items) < n:
        raise ValueError(f"--samples {n}: {data / 'questions.jsonl'} holds only {len(items)} questions")
    return items


def held_out_split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) sample indices, each ascending: n // 4 held out, drawn with `seed`."""
    held = set(random.Random(f"swiftvlm-calibrate:{seed}").sample(range(n), n // 4))
    return [i for i in range(n) if i not in held], sorted(held)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def run(args) -> int:
    from ..models.llava import LlavaForward
    from ..pruning.calibration import calibrate
    from .evaluation import batch_inputs, prompts_for

    check_options(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        path = _model_dir(args.model)
        model = LlavaForward.from_pretrained(path).eval()
        prompts = prompts_for(args.model, model)
        items = calibration_items(args.data, args.samples)
        train, held = held_out_split(len(items), args.seed)
        where = "the embedded trained tiny LLaVA (tiny-vqa)" if args.model is None else str(args.model)
        data = (f"synthetic VQA, split {CALIBRATION_SPLIT}, samples 0-{len(items) - 1}" if args.data is None
                else f"{args.data}, its first {len(items)} questions")
        print(f"model: {where}; data: {data}; {len(train)} training / {len(held)} held-out samples; rank "
              f"{args.rank}, {args.steps} Adam steps per layer, seed {args.seed}")
        t0 = time.perf_counter()
        selector = calibrate(model, batch_inputs([items[i] for i in train], prompts, model),
                             batch_inputs([items[i] for i in held], prompts, model), args.rank, layers=args.layers,
                             steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                             about={"model": where, "model_sha256": _sha256(path), "data": data})
    finally:
        torch.set_num_threads(threads)
    out = selector.save(args.out)
    print(f"{'layer':>5}  {'loss before':>11}  {'after':>9}  {'Spearman before':>15}  {'after':>5}  "
          f"{'top-third mass before':>21}  {'after':>5}")
    for layer, r in selector.record["calibration"]["per_layer"].items():
        print(f"{layer:>5}  {r['loss_before']:11.4f}  {r['loss_after']:9.4f}  {r['spearman_before']:15.3f}  "
              f"{r['spearman_after']:5.3f}  {r['top_third_mass_before']:21.3f}  {r['top_third_mass_after']:5.3f}")
    sys.stdout.write(f"wrote {out} (selector.json, selector.safetensors) in {time.perf_counter() - t0:.0f} s\n")
    return 0
