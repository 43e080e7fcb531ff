"""`python -m swiftvlm_kernels eval`: accuracy of vanilla, SwiftVLM, FastV, PDrop and ALVTS against the
visual-token budget, per question type, on the embedded trained tiny LLaVA (or any llava-hf
checkpoint directory) and the synthetic held-out set (or a dataset folder of your own).

    python -m swiftvlm_kernels eval [--n 2000 | --quick] [--budgets 0.5,0.333,0.222,0.2] [--out swiftvlm-eval]
        [--model CHECKPOINT_DIR] [--data DATASET_DIR] [--methods vanilla,swiftvlm,fastv,pdrop,alvts]
        [--selector SELECTOR_DIR|svd|svd:RANK]

What is measured. Every method and budget answers the same questions greedily through the
project's LLaVA forward (`LlavaForward`, the swiftvlm ops). A budget is the share of the visual
tokens the language model keeps per layer on average (merged tokens counted; `budget_ratio`), so
all methods spend the same prefill at one budget. Layers: FastV at layer 2 (its paper's K), PDrop at
2, L/2 and 3L/4, SwiftVLM at the library's default for the depth (`hf.default_layers`: 2, 4, 6 at
12 layers), ALVTS at every layer from 2 on (each layer its own k tokens); `--layers` overrides.
ALVTS' selector: the checkpoint directory's alvts-selector/ when it has one (the embedded model's is
calibrated: `python -m swiftvlm_kernels calibrate`), else the SVD default; `--selector` names another
(a directory `calibrate` wrote, or `svd`). A budget below what a method's first stage allows (the layers
before it run every visual token: 2 of 12 layers are already 1/6 of the tokens) is reported as
n/a. Besides accuracy the evaluation reports, where the questions name their patches (the
synthetic set; `boxes` in a dataset), the share of those patches the last stage keeps (ALVTS: the
mean over its layers of the share each layer keeps).

How sure the numbers are. --n questions (default 2000: the first of the synthetic held-out split;
--quick: the first 200, for a smoke test or CI). Every accuracy comes with its 95 % Wilson score
interval. Every question's outcome is kept per method and budget, so two runs are compared on the
same questions: the paired difference in accuracy of every pruned run against vanilla, and of every
two methods at one budget, with the 95 % interval of the mean per-question difference (the normal
interval: mean +- 1.96 standard deviations of the differences / sqrt(n)). Pairing removes what the
questions share, so a difference can be clear while the two accuracies' intervals overlap. Both are
closed-form: the same questions give the same intervals, nothing is resampled.

Outputs in --out: results.csv (one row per method, budget and question type: correct, total,
accuracy and its interval), differences.csv (one row per paired difference and question type: A,
B, questions, A - B and its interval), results.json (the same, with the settings and each run's
per-question outcomes), results.md (the tables in Markdown), accuracy.png (accuracy against budget
with 95 % error bars; the unpruned model dashed, its interval a grey band), differences.png (each
pruned run's accuracy minus vanilla's, in points, with the paired 95 % error bars; when vanilla
ran). The table (the overall
accuracy's interval beside it) and the paired differences are printed, and the files' paths.

Checkpoints: a directory with config.json and model.safetensors in the llava-hf layout. Prompts are
built with its vocab.json (a word vocabulary: the embedded model's; prompt.json says whether the
question also comes before the image) when present, else with its
Hugging Face tokenizer (`transformers.AutoTokenizer`, local files only) and the LLaVA-1.5 template
"USER: <image>\\n{question} ASSISTANT:". A word-vocabulary model answers with one token; a
tokenizer model generates up to --max-new-tokens and is correct when its first line, lower-cased
and stripped of surrounding spaces and final punctuation, equals the answer so normalised.

Dataset folders: `questions.jsonl`, one JSON object per line: {"image": "a.png", "question": "...",
"answer": "...", "kind": "colour" (optional: a question without one counts in the overall accuracy
only; "all", the overall column's name, is refused), "boxes": [[x0, y0, x1, y1], ...] (optional: the
pixel boxes the answer depends on, inside the image)}. Images are PNG (read by
swiftvlm_kernels.apps.png; other formats need Pillow), of at most 16.7 million pixels (4096 x 4096)
and 16384 on a side, resized to the model's image size. Files are untrusted, and every refusal names
the file and line: a line is a UTF-8 JSON object of at most 1 MiB (at most 100,000 lines); paths
must stay inside the folder; fields are type-checked (text without NUL characters or lone
surrogates; a question of at most 16,384 characters and 4,096 words, without "<image>"; an answer of
at most 1,024 characters; a kind of at most 64 printable characters, not "|"); an image's header
(format, size, file length) is checked when the folder is read, its pixels when its batch runs; and before
anything runs every prompt must fit the model's context (max_position_embeddings; with
--max-new-tokens for a tokenizer model), and --layers the model's depth.

Memory: the questions are read whole (their text; the synthetic set's 96 x 96 images too, 27 KB
each); a dataset's image is decoded when its batch needs it, one at a time, and dropped once
resized: the largest accepted ones (16.7 million pixels, 16384 on a side) take under 200 MiB to
decode and under 280 MiB to decode and resize to S <= 336 px. The last 64 resized images are kept (3
x S x S floats each, S the model's image size: 7 MiB for the embedded model's 96 px, 87 MiB at 336
px), and one batch's inputs at a time. So besides the model and one batch's activations an
evaluation holds at most one decoded image, 64 resized ones and one batch of inputs.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

import torch

from ..options import add_model_and_data, layer_list, positive, require_backend, shown_path
from .data import (MAX_LINES, ImageFile, Item, dataset_items, json_object, resize, synthetic_item, synthetic_items,
                   target_patches)
from .prompts import TokenizerPrompts, WordPrompts, batch_inputs, normalise, pixels, prompt_ids, prompts_for
from .report import kinds_of, markdown_differences, markdown_table, table, write_outputs
from .run import (DEFAULT_BUDGETS, METHODS, NAMES, Progress, Result, check_layers, eval_layers, evaluate,
                  make_method, paired_differences)
from .stats import Difference, paired_interval, wilson

__all__ = ["add_arguments", "run", "load_model", "load_selector", "Item", "ImageFile", "Result", "synthetic_item", "synthetic_items",
           "dataset_items", "json_object", "target_patches", "resize", "MAX_LINES", "WordPrompts", "TokenizerPrompts",
           "prompts_for", "normalise", "pixels", "prompt_ids", "batch_inputs", "DEFAULT_BUDGETS", "METHODS", "NAMES",
           "Progress", "eval_layers", "check_layers", "make_method", "evaluate", "kinds_of", "table",
           "markdown_table", "markdown_differences", "write_outputs", "paired_differences", "Difference",
           "paired_interval", "wilson", "DEFAULT_N", "QUICK_N"]

DEFAULT_N = 2000  # questions by default
QUICK_N = 200  # --quick


# -- the command --------------------------------------------------------------------------------------

def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated shares such as 0.5,0.333, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected shares in (0, 1], got {text!r}")
    return values


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    bad = [n for n in names if n not in METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(METHODS)}, got {text!r}")
    return names


def _layers(text: str) -> dict:
    """--layers swiftvlm=2:4:6,fastv=2,pdrop=2:6:9 (checked against the model's depth in run)."""
    out: dict = {}
    for part in text.split(","):
        name, _, spec = part.partition("=")
        name = name.strip().lower()
        if name not in METHODS[1:] or not spec:
            raise argparse.ArgumentTypeError(f"expected METHOD=L1:L2:... for {', '.join(METHODS[1:])}, got {part!r}")
        if name in out:
            raise argparse.ArgumentTypeError(f"expected each method once, got {name} twice")
        out[name] = layer_list(spec)
        if not all(v >= 1 for v in out[name]) or list(out[name]) != sorted(set(out[name])):
            raise argparse.ArgumentTypeError(f"expected increasing layers >= 1, got {spec!r}")
        if name == "fastv" and len(out[name]) != 1:
            raise argparse.ArgumentTypeError(f"expected one layer for fastv, got {spec!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, "the synthetic held-out set")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--n", type=positive, default=None,
                      help=f"questions (default {DEFAULT_N}; the first n of the held-out set or the dataset)")
    size.add_argument("--quick", action="store_true",
                      help=f"the first {QUICK_N} questions only: a quick check (wide intervals), e.g. for CI")
    parser.add_argument("--budgets", type=_budgets, default=DEFAULT_BUDGETS,
                        help="shares of the visual tokens per layer (default 0.5,0.333,0.222,0.2)")
    parser.add_argument("--methods", type=_methods, default=METHODS, help=f"default {','.join(METHODS)}")
    parser.add_argument("--layers", type=_layers, default=None,
                        help="e.g. swiftvlm=2:4:6,fastv=2,pdrop=2:6:9,alvts=2:4:8 (increasing, 1-indexed; checked "
                             "against the model before anything runs)")
    parser.add_argument("--selector", type=_selector_choice, default=None, metavar="DIR|svd|svd:RANK",
                        help="ALVTS' selector: a directory written by `calibrate`, or the SVD default (svd: rank "
                             "min(128, d); svd:RANK); default: the checkpoint's alvts-selector/ when it has one, else svd")
    parser.add_argument("--batch-size", type=positive, default=50)
    parser.add_argument("--max-new-tokens", type=positive, default=8, help="tokenizer models: answer length")
    parser.add_argument("--out", type=Path, default=Path("swiftvlm-eval"), help="output folder (default swiftvlm-eval)")
    parser.add_argument("--backend", default=None, choices=("auto", "torch", "cpu", "triton", "cuda"),
                        help="swiftvlm op backend (default: auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive, default=None, help="CPU threads (default: torch's)")


def load_model(model_dir: Optional[Path], device="cpu"):
    """The embedded trained tiny LLaVA (None) or a checkpoint directory's model, fp32 on `device`."""
    from ...models.llava import LlavaForward
    from ..trained import TRAINED_DIR

    path = TRAINED_DIR if model_dir is None else model_dir
    if not (path / "config.json").is_file():
        raise ValueError(f"--model: expected a directory with config.json and model.safetensors, got {path}")
    return LlavaForward.from_pretrained(path, device=device)


def _selector_choice(text: str) -> str:
    """--selector: svd, svd:RANK or a directory (checked when the command runs)."""
    if text.startswith("svd:"):
        positive(text[4:])
    return text


def load_selector(choice: Optional[str], model, model_dir: Optional[Path], layers) -> tuple:
    """(ALVTS' selector for `layers` of `model`, a description) for --selector: a directory, svd (the
    default: rank min(128, d)), svd:RANK, or None (the alvts-selector/ of the checkpoint directory
    model_dir, None: the embedded model's, when it has one, else the default)."""
    from ...pruning.selector import DEFAULT_RANK, Selector
    from ..trained import checkpoint_selector

    if choice is not None and choice.startswith("svd"):
        rank = min(int(choice[4:] or DEFAULT_RANK), model.text_config.hidden_size)
        return Selector.from_layers(model.language_model.layers, layers, rank), f"svd, rank {rank}"
    if choice is not None and not Path(choice).is_dir():
        raise ValueError(f"--selector: expected a selector directory (selector.json, selector.safetensors), svd or "
                         f"svd:RANK, got {choice}")
    selector = Selector.load(Path(choice)) if choice is not None else checkpoint_selector(model_dir)
    if selector is None:
        return load_selector("svd", model, model_dir, layers)
    where = choice if choice is not None else "the checkpoint's alvts-selector/"
    return selector, f"{where}: {selector.record.get('init')}, rank {selector.rank}"


def run(args) -> int:
    device = torch.device(args.device)
    require_backend(args.backend, device.type)
    if args.selector is not None and not args.selector.startswith("svd") and not Path(args.selector).is_dir():
        raise ValueError(f"--selector: expected a selector directory (selector.json, selector.safetensors), svd or "
                         f"svd:RANK, got {args.selector}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device)
    model.backend = args.backend
    model.eval()
    layers = {**eval_layers(model.num_layers), **(args.layers or {})}
    check_layers({m: layers[m] for m in args.methods if m != "vanilla"} | (args.layers or {}), model, "--layers")
    prompts = prompts_for(args.model, model)
    n = args.n or (QUICK_N if getattr(args, "quick", False) else DEFAULT_N)
    items = synthetic_items(n) if args.data is None else dataset_items(args.data, n)
    selector, about_selector = load_selector(args.selector, model, args.model, layers["alvts"]) \
        if "alvts" in args.methods else (None, None)
    where = "embedded trained tiny LLaVA" if args.model is None else str(args.model)
    data = "synthetic held-out set (split 1)" if args.data is None else str(args.data)
    print(f"model: {where} ({model.num_visual_tokens} visual tokens, {model.num_layers} layers); data: {data}, "
          f"{len(items)} questions")
    print("layers: " + ", ".join(f"{NAMES[m]} {layers[m]}" for m in args.methods if m != "vanilla")
          + (f"; ALVTS selector: {about_selector}" if about_selector else ""))
    runs = sum(1 if m == "vanilla" else len(args.budgets) for m in args.methods)
    batches = math.ceil(len(items) / args.batch_size)
    progress = Progress(runs * batches)
    results = evaluate(model, items, prompts, args.methods, args.budgets, layers, args.batch_size,
                       args.max_new_tokens, progress, device, selector=selector)
    print(table(results))
    settings = {"model": where, "data": data, "n": len(items), "budgets": list(args.budgets),
                "methods": list(args.methods), "layers": {k: list(v) for k, v in layers.items()},
                "alvts_selector": about_selector,
                "backend": args.backend or "auto", "device": str(device), "torch": torch.__version__}
    title = f"accuracy against visual-token budget ({len(items)} questions)"
    paths = write_outputs(results, args.out, settings, title)
    print("wrote " + ", ".join(shown_path(p) for p in paths.values()))
    return 0
