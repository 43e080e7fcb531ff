"""Evaluate a transformers VLM checkpoint directory on a local dataset folder, unpruned and pruned.

    python3 bench/hf_eval.py CHECKPOINT_DIR DATASET_DIR [--methods none,swiftvlm,fastv,pdrop,alvts]
        [--budget-ratio 0.333] [--layers 3,11,15] [--pdrop-official] [--max-new-tokens 16]
        [--batch-size 4] [--dtype float16] [--device cuda] [--backend auto] [--limit N] [--output out.json]

Design: the model is loaded once (`AutoModelForImageTextToText`, sdpa attention); every method runs
over the same batches through `swiftvlm_kernels.hf.apply` (greedy `generate`, left padding), and
the script reports per method: exact-match accuracy against the dataset's answers, agreement with
the unpruned model's answers (the first method, "none", when listed), the prefill's visual tokens
per layer (average of the KV-cache lengths minus the text tokens) and the wall time.

DATASET_DIR holds `data.jsonl`, one JSON object per line, in one of two forms:
- text form (needs the checkpoint's processor and Pillow): {"image": "cat.png" (or a list),
  "question": "...", "answer": "..."}. The prompt is the processor's chat template with one image
  and the question, or `--prompt` ("{question}" is replaced; it must hold the image token).
  A prediction is correct when its first line, lower-cased and stripped of surrounding spaces and
  final punctuation, equals the answer so normalised (`swiftvlm_kernels.apps.evaluation.normalise`,
  the `eval` command's rule).
- token form (no processor; any model): {"input_ids": [...], "tensors": "s0.safetensors",
  "answer_ids": [...]}: the prompt's token ids, a safetensors file with the image tensors the model
  takes (pixel_values, and image_sizes / image_grid_thw / mm_token_type_ids as the model needs),
  and the answer's token ids; correct when the generated ids start with answer_ids.
Files are untrusted: paths must stay inside DATASET_DIR, every JSON field is type-checked and each
safetensors header (names, dtypes, shapes, at most 64 Mi elements a file) is read before any tensor.
Nothing is unpickled.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

MAX_ELEMENTS = 64 * 2**20
TENSOR_NAMES = ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")


def _inside(root: Path, name, field: str, line: int) -> Path:
    if not isinstance(name, str) or not name:
        raise ValueError(f"data.jsonl line {line}: {field}: expected a file name (string), got {name!r}")
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise ValueError(f"data.jsonl line {line}: {field}: expected a file inside {root}, got {name!r}")
    return path


def _int_list(value, field: str, line: int) -> list:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           and 0 <= v < 2**31 for v in value):
        raise ValueError(f"data.jsonl line {line}: {field}: expected a non-empty list of token ids, got {value!r:.80}")
    return value


def read_dataset(root, limit: Optional[int] = None) -> list:
    """The dataset's entries, validated (see the module docstring).

    Parameters
    ----------
    root: the dataset folder (holding data.jsonl).
    limit: read at most this many entries.

    Returns
    -------
    list of dicts: token form {"input_ids", "answer_ids", "tensors": Path}, text form
    {"images": [Path], "question", "answer"}.

    Raises
    ------
    ValueError: naming the line and field of a malformed entry, a path outside root, an unreadable or
        oversized safetensors file, an empty dataset or one that mixes both forms.
    """
    from swiftvlm_kernels.apps.evaluation import json_object
    from swiftvlm_kernels.apps.untrusted import jsonl_lines

    root = Path(root)
    data = root / "data.jsonl"
    if not data.is_file():
        raise ValueError(f"dataset: expected {data} (one JSON object per line)")
    entries = []
    for line, raw in jsonl_lines(data):
        item = json_object(raw, data.name, line)
        if item is None:
            continue
        if "input_ids" in item:
            entries.append({"input_ids": _int_list(item["input_ids"], "input_ids", line),
                            "answer_ids": _int_list(item.get("answer_ids"), "answer_ids", line),
                            "tensors": _check_tensors(_inside(root, item.get("tensors"), "tensors", line), line)})
        else:
            images = item.get("image")
            images = images if isinstance(images, list) else [images]
            for field in ("question", "answer"):
                if not isinstance(item.get(field), str):
                    raise ValueError(f"data.jsonl line {line}: {field}: expected a string, got {item.get(field)!r}")
            entries.append({"images": [_inside(root, im, "image", line) for im in images],
                            "question": item["question"], "answer": item["answer"]})
        if limit is not None and len(entries) >= limit:
            break
    if not entries:
        raise ValueError(f"dataset: {data} holds no entries")
    if len({"input_ids" in e for e in entries}) > 1:
        raise ValueError("dataset: mixes the text form and the token form; use one")
    return entries


def _check_tensors(path: Path, line: int) -> Path:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for name in names:
                if name not in TENSOR_NAMES:
                    raise ValueError(f"data.jsonl line {line}: {path.name}: unexpected tensor {name!r} (expected "
                                     f"some of {', '.join(TENSOR_NAMES)})")
                shape = f.get_slice(name).get_shape()
                if math.prod(shape) > MAX_ELEMENTS:
                    raise ValueError(f"data.jsonl line {line}: {path.name}: tensor {name} of shape {shape} exceeds "
                                     f"{MAX_ELEMENTS} elements")
    except ValueError:
        raise
    except Exception as err:  # a malformed header
        raise ValueError(f"data.jsonl line {line}: {path.name}: not a readable safetensors file ({err})") from None
    if "pixel_values" not in names:
        raise ValueError(f"data.jsonl line {line}: {path.name}: expected a pixel_values tensor")
    return path


def _token_batches(entries, batch_size, pad_id, device):
    """Left-padded batches of the token form: (inputs, answers)."""
    from safetensors.torch import load_file

    for at in range(0, len(entries), batch_size):
        part = entries[at:at + batch_size]
        L = max(len(e["input_ids"]) for e in part)
        ids = torch.full((len(part), L), pad_id, dtype=torch.long)
        mask = torch.zeros(len(part), L, dtype=torch.long)
        tensors = [load_file(str(e["tensors"])) for e in part]
        for b, e in enumerate(part):
            n = len(e["input_ids"])
            ids[b, L - n:] = torch.tensor(e["input_ids"])
            mask[b, L - n:] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        for name in TENSOR_NAMES:
            if name not in tensors[0]:
                continue
            if name == "mm_token_type_ids":
                types = torch.zeros(len(part), L, dtype=torch.int)
                for b, t in enumerate(tensors):
                    types[b, L - t[name].shape[-1]:] = t[name].reshape(-1)
                inputs[name] = types
            elif name == "pixel_values" and tensors[0][name].dim() == 5:  # LLaVA-NeXT [1, patches, C, H, W]
                patches = max(t[name].shape[1] for t in tensors)
                inputs[name] = torch.cat([torch.nn.functional.pad(t[name], (0, 0, 0, 0, 0, 0, 0, patches - t[name].shape[1]))
                                          for t in tensors])
            else:
                inputs[name] = torch.cat([t[name] for t in tensors])
        yield {k: v.to(device) for k, v in inputs.items()}, [e["answer_ids"] for e in part]


def _text_batches(entries, batch_size, processor, prompt, device):
    from PIL import Image  # the text form needs Pillow (as HF image processors do)

    for at in range(0, len(entries), batch_size):
        part = entries[at:at + batch_size]
        texts, images = [], []
        for e in part:
            if prompt is not None:
                texts.append(prompt.replace("{question}", e["question"]))
            else:
                content = [{"type": "image"}] * len(e["images"]) + [{"type": "text", "text": e["question"]}]
                texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                           add_generation_prompt=True))
            images.extend(Image.open(p).convert("RGB") for p in e["images"])
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        yield {k: v.to(device) for k, v in inputs.items()}, [e["answer"] for e in part]


def make_method(name: str, layers: Optional[Sequence[int]], budget_ratio: float, official: bool, num_layers: int):
    """The pruning object for a method name.

    Parameters
    ----------
    name: "none", "swiftvlm", "fastv", "pdrop" or "alvts".
    layers: the pruning layers (None: `swiftvlm_kernels.hf.default_layers` for num_layers).
    budget_ratio: T = budget_ratio * n_vis (the library's budget rule).
    official: PDrop's official variant.
    num_layers: the model's depth.

    Returns
    -------
    None for "none", else SwiftVLM / FastV / PDrop / ALVTS.

    Raises
    ------
    ValueError: an unknown method name.
    """
    from swiftvlm_kernels import hf
    from swiftvlm_kernels.pruning import ALVTS, FastV, PDrop, SwiftVLM

    if name == "none":
        return None
    if name not in ("swiftvlm", "fastv", "pdrop", "alvts"):
        raise ValueError(f"--methods: expected none, swiftvlm, fastv, pdrop or alvts, got {name!r}")
    chosen = tuple(layers) if layers else hf.default_layers(num_layers, name)
    if name == "alvts":
        return ALVTS(layers=chosen, budget_ratio=budget_ratio)
    if name == "fastv":
        return FastV(layer=chosen[0], budget_ratio=budget_ratio)
    if name == "pdrop":
        return PDrop(layers=chosen, budget_ratio=budget_ratio, official=official)
    return SwiftVLM(layers=chosen, budget_ratio=budget_ratio)


def evaluate(checkpoint, dataset, methods=("none", "swiftvlm"), *, budget_ratio=1 / 3, layers=None, official=False,
             max_new_tokens=16, batch_size=4, dtype="float32", device="cpu", backend=None, prompt=None, limit=None,
             model=None, processor=None) -> dict:
    """Run every method over the dataset with greedy generation.

    Parameters
    ----------
    checkpoint: an HF checkpoint directory (config, safetensors, and processor files for the text form).
    dataset: the dataset folder (see the module docstring).
    methods: method names, in order; the first is the reference for `agreement_with_first`.
    budget_ratio, layers, official: the pruning setting (see `make_method`).
    max_new_tokens, batch_size, dtype, device, backend, prompt, limit: as the command line's options.
    model, processor: already loaded ones instead of loading from checkpoint.

    Returns
    -------
    {"checkpoint", "dataset", "budget_ratio", "max_new_tokens", "methods": {name: {"n", "accuracy",
    "seconds", "mean_rows_per_layer" (pruned methods: the prefill's rows per layer, averaged over
    layers and batches), "agreement_with_first" (all but the first)}}}.

    Raises
    ------
    ValueError: a malformed dataset (see `read_dataset`) or an unknown method.
    """
    import transformers
    from swiftvlm_kernels import hf
    from swiftvlm_kernels.apps.evaluation import normalise

    entries = read_dataset(dataset, limit)
    tokens = "input_ids" in entries[0]
    if model is None:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            checkpoint, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
    if processor is None and not tokens:
        processor = transformers.AutoProcessor.from_pretrained(checkpoint, padding_side="left")
    num_layers = len(model.model.language_model.layers)
    pad_id = getattr(model.generation_config, "pad_token_id", None) or 0
    results, reference = {}, None
    for name in methods:
        pruning = make_method(name, layers, budget_ratio, official, num_layers)
        hf.apply(model, None)
        if pruning is not None:
            hf.apply(model, pruning, backend=backend)
        batches = _token_batches(entries, batch_size, pad_id, device) if tokens else \
            _text_batches(entries, batch_size, processor, prompt, device)
        answers, correct, visual, start = [], 0, [], time.perf_counter()
        with torch.no_grad():
            for inputs, truth in batches:
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
                new = out[:, inputs["input_ids"].shape[1]:]
                for b, want in enumerate(truth):
                    if tokens:
                        got = new[b].tolist()
                        ok = got[:len(want)] == want
                    else:
                        got = normalise(processor.decode(new[b], skip_special_tokens=True))
                        ok = got == normalise(want)
                    answers.append(got)
                    correct += ok
                record = hf.last_prefill(model)
                if pruning is not None and record is not None:
                    visual.append(sum(record.layer_lengths) / len(record.layer_lengths))
        seconds = time.perf_counter() - start
        metrics = {"n": len(answers), "accuracy": correct / len(answers), "seconds": seconds}
        if visual:
            metrics["mean_rows_per_layer"] = sum(visual) / len(visual)
        if reference is None:
            reference = answers
        else:
            metrics["agreement_with_first"] = sum(a == r for a, r in zip(answers, reference)) / len(answers)
        results[name] = metrics
    hf.apply(model, None)
    return {"checkpoint": str(checkpoint), "dataset": str(dataset), "budget_ratio": budget_ratio,
            "max_new_tokens": max_new_tokens, "methods": results}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("dataset")
    parser.add_argument("--methods", default="none,swiftvlm,fastv,pdrop")
    parser.add_argument("--budget-ratio", type=float, default=1 / 3)
    parser.add_argument("--layers", default=None, help="comma-separated 1-indexed pruning layers (default: per model)")
    parser.add_argument("--pdrop-official", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    result = evaluate(args.checkpoint, args.dataset, [m.strip() for m in args.methods.split(",") if m.strip()],
                      budget_ratio=args.budget_ratio, layers=layers, official=args.pdrop_official,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype=args.dtype,
                      device=args.device, backend=args.backend, prompt=args.prompt, limit=args.limit)
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
