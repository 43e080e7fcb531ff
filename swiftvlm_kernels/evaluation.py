"""`python -m swiftvlm_kernels eval`: accuracy of vanilla, SwiftVLM, FastV and PDrop against the
visual-token budget, per question type, on the embedded trained tiny LLaVA (or any llava-hf
checkpoint directory) and the synthetic held-out set (or a dataset folder of your own).

    python -m swiftvlm_kernels eval [--n 1000] [--budgets 0.5,0.333,0.222,0.2] [--out swiftvlm-eval]
        [--model CHECKPOINT_DIR] [--data DATASET_DIR] [--methods vanilla,swiftvlm,fastv,pdrop]

What is measured. Every method and budget answers the same questions greedily through the
project's LLaVA forward (`LlavaForward`, the swiftvlm ops). A budget is the share of the visual
tokens the language model keeps per layer on average (merged tokens counted; `budget_ratio`), so
all methods spend the same prefill at one budget. Layers: FastV at layer 2 (its paper's K), PDrop at
2, L/2 and 3L/4, SwiftVLM at the library's default for the depth (`hf.default_layers`: 2, 4, 6 at
12 layers); `--layers` overrides. A budget below what a method's first stage allows (the layers
before it run every visual token: 2 of 12 layers are already 1/6 of the tokens) is reported as
n/a. Besides accuracy the evaluation reports, where the questions name their patches (the
synthetic set; `boxes` in a dataset), the share of those patches the last stage keeps.

Outputs in --out: results.csv (one row per method, budget and question type), results.json (the
same, with the settings), results.md (the table in Markdown), accuracy.png (accuracy against budget; the unpruned model dashed). The
table is printed.

Checkpoints: a directory with config.json and model.safetensors in the llava-hf layout. Prompts are
built with its vocab.json (a word vocabulary: the embedded model's; prompt.json says whether the
question also comes before the image) when present, else with its
Hugging Face tokenizer (`transformers.AutoTokenizer`, local files only) and the LLaVA-1.5 template
"USER: <image>\\n{question} ASSISTANT:". A word-vocabulary model answers with one token; a
tokenizer model generates up to --max-new-tokens and is correct when its first line, lower-cased
and stripped of surrounding spaces and final punctuation, equals the answer so normalised.

Dataset folders: `questions.jsonl`, one JSON object per line: {"image": "a.png", "question": "...",
"answer": "...", "kind": "colour" (optional, default "all"), "boxes": [[x0, y0, x1, y1], ...]
(optional: the pixel boxes the answer depends on)}. Images are PNG (read by swiftvlm_kernels.png;
other formats need Pillow), resized to the model's image size. Files are untrusted: paths must stay
inside the folder, fields are type-checked, image sizes are checked before decoding.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import synth
from .figures import accuracy_plot
from .png import read_png, write_png
from .pruning import FastV, PDrop, SwiftVLM, prefill_flops

DEFAULT_BUDGETS = (0.5, 1 / 3, 2 / 9, 0.2)
METHODS = ("vanilla", "swiftvlm", "fastv", "pdrop")
NAMES = {"vanilla": "vanilla", "swiftvlm": "SwiftVLM", "fastv": "FastV", "pdrop": "PDrop"}
MAX_LINES = 100_000


@dataclass
class Item:
    """One question: image uint8 [3, H, W], the question text, the answer, its kind, and the pixel
    boxes the answer depends on (may be empty)."""
    image: Tensor
    question: str
    answer: str
    kind: str = "all"
    boxes: tuple = ()


@dataclass
class Result:
    """One method at one budget: correct answers and target patches kept, per question kind."""
    method: str
    budget: Optional[float]
    tokens_per_layer: float
    flops_share: float
    right: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)
    target_kept: dict = field(default_factory=dict)
    target_total: dict = field(default_factory=dict)
    feasible: bool = True

    def accuracy(self, kind: Optional[str] = None) -> Optional[float]:
        if not self.feasible:
            return None
        r = sum(self.right.values()) if kind is None else self.right.get(kind, 0)
        t = sum(self.total.values()) if kind is None else self.total.get(kind, 0)
        return r / t if t else None

    def target_share(self, kind: Optional[str] = None) -> Optional[float]:
        if not self.feasible:
            return None
        r = sum(self.target_kept.values()) if kind is None else self.target_kept.get(kind, 0)
        t = sum(self.target_total.values()) if kind is None else self.target_total.get(kind, 0)
        return r / t if t else None


# -- data -------------------------------------------------------------------------------------------

def synthetic_items(n: int, seed: int = 1, grid: int = synth.GRID, cell: int = synth.CELL) -> list[Item]:
    """The first n samples of the synthetic split `seed` (1: the held-out split) as items."""
    items = []
    for i in range(n):
        s = synth.sample(seed, i, grid=grid, cell=cell)
        boxes = tuple((c * cell, r * cell, (c + 1) * cell, (r + 1) * cell) for r, c in s.cells_in_question())
        items.append(Item(s.image, " ".join(s.question), s.answer, s.kind, boxes))
    return items


def _field(entry: dict, name: str, kind, line: int, required: bool = True):
    value = entry.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"questions.jsonl line {line}: {name}: expected {kind.__name__}, got {value!r:.80}")
    return value


def _read_image(path: Path) -> Tensor:
    if path.suffix.lower() == ".png":
        return read_png(path)
    try:
        from PIL import Image  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(f"{path}: only PNG images are read without Pillow (pip install pillow)") from None
    with Image.open(path) as im:
        if im.width * im.height > 4096 * 4096:
            raise ValueError(f"{path}: expected at most 4096 x 4096 pixels, got {im.width} x {im.height}")
        rgb = im.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def dataset_items(root, limit: Optional[int] = None) -> list[Item]:
    """The items of a dataset folder (module docstring), validated.

    Raises
    ------
    ValueError
        a missing questions.jsonl, a malformed line (naming line and field), an image path outside
        the folder, an unreadable image, or no questions.
    """
    root = Path(root)
    listing = root / "questions.jsonl"
    if not listing.is_file():
        raise ValueError(f"--data: expected a folder holding questions.jsonl, got {root}")
    items: list[Item] = []
    with listing.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if line > MAX_LINES:
                raise ValueError(f"questions.jsonl: expected at most {MAX_LINES} lines")
            if not text.strip():
                continue
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"questions.jsonl line {line}: expected a JSON object ({e.msg})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"questions.jsonl line {line}: expected a JSON object, got {type(entry).__name__}")
            name = _field(entry, "image", str, line)
            path = (root / name).resolve()
            if not path.is_relative_to(root.resolve()) or not path.is_file():
                raise ValueError(f"questions.jsonl line {line}: image: expected a file inside {root}, got {name!r}")
            question = _field(entry, "question", str, line)
            answer = _field(entry, "answer", str, line)
            kind = _field(entry, "kind", str, line, required=False) or "all"
            raw_boxes = _field(entry, "boxes", list, line, required=False) or []
            boxes = []
            for b in raw_boxes:
                if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                    and v >= 0 for v in b) and b[0] < b[2] and b[1] < b[3]):
                    raise ValueError(f"questions.jsonl line {line}: boxes: expected [x0, y0, x1, y1] pixel boxes "
                                     f"with x0 < x1, y0 < y1, got {b!r:.80}")
                boxes.append(tuple(b))
            items.append(Item(_read_image(path), question, answer, kind, tuple(boxes)))
    if not items:
        raise ValueError(f"--data: {listing} holds no questions")
    return items


# -- prompts ----------------------------------------------------------------------------------------

_PUNCT = "?!.,;:"


def normalise(text: str) -> str:
    """An answer for comparison: its first line, lower-cased, stripped of surrounding spaces and
    final punctuation."""
    first = text.strip().split("\n")[0].strip().lower()
    return first.rstrip(string.punctuation + " ").strip()


class WordPrompts:
    """Prompts of a word-vocabulary model (vocab.json: the embedded model's): <bos>, the question's
    words when question_first (prompt.json), the image tokens, the question's words; words
    lower-cased, punctuation dropped as in training, unknown words <unk>. One-token answers."""

    def __init__(self, vocab: Sequence[str], image_token_id: int, question_first: bool = False):
        self.question_first = question_first
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.image_token_id = image_token_id
        self.one_token = True

    def words(self, question: str) -> list[str]:
        for p in _PUNCT:
            question = question.replace(p, " ")
        return question.lower().split()

    def ids(self, question: str, n_image: int) -> list[int]:
        bos, unk = self.index.get("<bos>", 0), self.index.get("<unk>", 0)
        words = [self.index.get(w, unk) for w in self.words(question)]
        return [bos] + (words if self.question_first else []) + [self.image_token_id] * n_image + words

    def answer_id(self, answer: str) -> int:
        return self.index.get(normalise(answer), -1)  # -1: never predicted (an answer outside the vocabulary)

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] if 0 <= i < len(self.vocab) else "<image>" for i in ids)


class TokenizerPrompts:
    """Prompts of a Hugging Face tokenizer model: the LLaVA-1.5 template with the image token
    expanded to the model's visual tokens; answers generated."""

    TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

    def __init__(self, tokenizer, image_token_id: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.one_token = False

    def ids(self, question: str, n_image: int) -> list[int]:
        before, after = self.TEMPLATE.format(question=question).split("<image>")
        head = self.tokenizer(before, add_special_tokens=True)["input_ids"]
        tail = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        return list(head) + [self.image_token_id] * n_image + list(tail)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.image_token_id], skip_special_tokens=True)


def prompts_for(model_dir: Optional[Path], model):
    """WordPrompts from vocab.json (the embedded model when model_dir is None), else the
    directory's tokenizer."""
    from .models.tiny import trained_prompt, trained_vocab

    if model_dir is None or (model_dir / "vocab.json").is_file():
        vocab = trained_vocab(model_dir)
        if len(vocab) > model.language_model.embed_tokens.num_embeddings:
            raise ValueError(f"--model: vocab.json has {len(vocab)} words, more than the model's vocabulary")
        return WordPrompts(vocab, model.image_token_id, trained_prompt(model_dir)["question_first"])
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"--model {model_dir}: no vocab.json, and transformers (for its tokenizer) is not "
                         "installed") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises several types for a missing / bad tokenizer
        raise ValueError(f"--model {model_dir}: no vocab.json and no loadable tokenizer ({e})") from None
    return TokenizerPrompts(tokenizer, model.image_token_id)


def pixels(images: Sequence[Tensor], size: int, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276)) -> Tensor:
    """fp32 [B, 3, size, size]: uint8 images resized (bilinear, antialiased) and CLIP-normalised."""
    out = []
    for im in images:
        x = im.float()[None] / 255
        if tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
        out.append(x[0])
    x = torch.stack(out)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def batch_inputs(items: Sequence[Item], prompts, model, device="cpu", dtype=torch.float32) -> dict:
    """input_ids / attention_mask (left-padded) / pixel_values for the model."""
    rows = [prompts.ids(it.question, model.num_visual_tokens) for it in items]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = True
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "pixel_values": pixels([it.image for it in items], model.image_size).to(device, dtype)}


def target_patches(item: Item, image_size: tuple[int, int], grid: int) -> Tensor:
    """Indices (row-major, of a grid x grid patch grid) of the patches that overlap the item's boxes."""
    H, W = image_size
    on = torch.zeros(grid, grid, dtype=torch.bool)
    for x0, y0, x1, y1 in item.boxes:
        r0, r1 = int(y0 * grid // H), int(math.ceil(min(y1, H) * grid / H))
        c0, c1 = int(x0 * grid // W), int(math.ceil(min(x1, W) * grid / W))
        on[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = True
    return on.flatten().nonzero().flatten()


# -- methods ----------------------------------------------------------------------------------------

def eval_layers(num_layers: int) -> dict:
    """Default layers per method for a decoder of num_layers (module docstring)."""
    from .hf import default_layers

    pdrop = tuple(sorted({2, *(max(3, min(num_layers - 1, round(num_layers * f))) for f in (0.5, 0.75))}))
    return {"swiftvlm": default_layers(num_layers, "swiftvlm"), "fastv": (2,), "pdrop": pdrop}


def make_method(name: str, budget: float, layers: Sequence[int]):
    """The pruning object of `name` at `budget` (a share of the visual tokens) and `layers`."""
    if name == "swiftvlm":
        return SwiftVLM(layers=tuple(layers), budget_ratio=budget)
    if name == "fastv":
        return FastV(layer=layers[0], budget_ratio=budget)
    if name == "pdrop":
        return PDrop(layers=tuple(layers), budget_ratio=budget)
    raise ValueError(f"--methods: expected names from {', '.join(METHODS)}, got {name!r}")


# -- the evaluation ---------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on a stream (only drawn when the stream is a terminal, else one line
    per 10 %)."""

    def __init__(self, total: int, stream=None, label: str = "eval"):
        self.total, self.done, self.label = max(1, total), 0, label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self.last_decile = time.time(), -1

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        frac = min(1.0, self.done / self.total)
        elapsed = time.time() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:.0f}s (eta {eta:.0f}s) {note}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            if self.done >= self.total:
                self.stream.write("\n")
        elif int(10 * frac) > self.last_decile:
            self.last_decile = int(10 * frac)
            self.stream.write(line + "\n")
        self.stream.flush()


def _predict(model, prompts, inputs, pruning, max_new_tokens: int):
    """(predicted answers as text or ids, the stages' kept indices)."""
    with torch.no_grad():
        out = model(**inputs, pruning=pruning)
        if prompts.one_token:
            return out.last_logits.argmax(-1).tolist(), out.kept
        tokens = model.generate(**inputs, pruning=pruning, max_new_tokens=max_new_tokens)
    return [prompts.decode(row) for row in tokens.tolist()], out.kept


def evaluate(model, items: Sequence[Item], prompts, methods: Sequence[str] = METHODS,
             budgets: Sequence[float] = DEFAULT_BUDGETS, layers: Optional[dict] = None, batch_size: int = 32,
             max_new_tokens: int = 8, progress: Optional[Progress] = None, device="cpu",
             dtype=torch.float32) -> list[Result]:
    """Every method at every budget (vanilla once) on `items`; see the module docstring."""
    layers = {**eval_layers(model.num_layers), **(layers or {})}
    text = model.text_config
    grid = int(round(math.sqrt(model.num_visual_tokens - model.keep_cls)))
    runs: list[tuple[str, Optional[float]]] = [(m, None) if m == "vanilla" else (m, b)
                                               for m in methods for b in ((None,) if m == "vanilla" else budgets)]
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    inputs = [batch_inputs(b, prompts, model, device, dtype) for b in batches]
    targets = [[target_patches(it, (it.image.shape[1], it.image.shape[2]), grid) for it in b] for b in batches]
    # the FLOPs share is reported for the questions' mean prompt length
    n_text = round(sum(int(i["attention_mask"].sum()) for i in inputs) / max(1, len(items))) - model.num_visual_tokens
    results = []
    for method, budget in runs:
        pruning = None
        try:
            pruning = None if budget is None else make_method(method, budget, layers[method])
            plan = model.plan_for(pruning)
        except ValueError:  # a budget below what the method's layers allow
            results.append(Result(NAMES[method], budget, float("nan"), float("nan"), feasible=False))
            if progress:
                progress.update(len(batches), f"{NAMES[method]} {budget:.0%}: n/a")
            continue
        flops = prefill_flops(text, n_text, model.num_visual_tokens, plan).total / \
            prefill_flops(text, n_text, model.num_visual_tokens).total
        per_layer = plan.average_visual_tokens() if plan else float(model.num_visual_tokens)
        res = Result(NAMES[method], budget, per_layer, flops)
        for batch, inp, tg in zip(batches, inputs, targets):
            pred, kept = _predict(model, prompts, inp, pruning, max_new_tokens)
            for b, it in enumerate(batch):
                if prompts.one_token:
                    ok = pred[b] == prompts.answer_id(it.answer)
                else:
                    ok = normalise(pred[b]) == normalise(it.answer)
                res.right[it.kind] = res.right.get(it.kind, 0) + int(ok)
                res.total[it.kind] = res.total.get(it.kind, 0) + 1
                if len(tg[b]):
                    last = kept[-1][b] if kept else torch.arange(model.num_visual_tokens)
                    hit = torch.isin(tg[b].to(last.device), last).sum().item()
                    res.target_kept[it.kind] = res.target_kept.get(it.kind, 0) + hit
                    res.target_total[it.kind] = res.target_total.get(it.kind, 0) + len(tg[b])
            if progress:
                label = NAMES[method] if budget is None else f"{NAMES[method]} {budget:.0%}"
                progress.update(1, label)
        results.append(res)
    return results


def kinds_of(results: Sequence[Result]) -> list[str]:
    seen: dict = {}
    for r in results:
        for k in r.total:
            seen.setdefault(k, None)
    order = [k for k in synth.KINDS if k in seen]
    return order + [k for k in seen if k not in order]


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def table(results: Sequence[Result]) -> str:
    """The results as a fixed-width text table (accuracy in %, per kind and overall)."""
    kinds = kinds_of(results)
    head = ["method", "budget", "tok/layer", "FLOPs", "all"] + kinds + ["targets kept"]
    rows = [head]
    for r in results:
        rows.append([r.method, "100%" if r.budget is None else f"{100 * r.budget:.0f}%",
                     "n/a" if not r.feasible else f"{r.tokens_per_layer:.1f}",
                     "n/a" if not r.feasible else f"{100 * r.flops_share:.0f}%", _pct(r.accuracy())]
                    + [_pct(r.accuracy(k)) for k in kinds] + [_pct(r.target_share())])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(results: Sequence[Result]) -> str:
    """The results as a Markdown table (accuracy in %), the form the README quotes."""
    kinds = kinds_of(results)
    names = {"coarse": "background"}
    head = ["method", "budget", "tokens / layer", "prefill FLOPs", "all"] + [names.get(k, k) for k in kinds] + \
        ["targets kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.method, "100 %" if r.budget is None else f"{100 * r.budget:.0f} %",
                 "n/a" if not r.feasible else f"{r.tokens_per_layer:.1f}",
                 "n/a" if not r.feasible else f"{100 * r.flops_share:.0f} %", _pct(r.accuracy())]
        cells += [_pct(r.accuracy(k)) for k in kinds] + [_pct(r.target_share())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(results: Sequence[Result], out: Path, settings: dict, title: str) -> dict:
    """results.csv, results.json, results.md and accuracy.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown_table(results))
    kinds = kinds_of(results)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "budget", "visual_tokens_per_layer", "prefill_flops_share", "kind", "correct", "total",
                    "accuracy", "target_patches_kept_share"])
        for r in results:
            for k in ["all"] + kinds:
                kind = None if k == "all" else k
                acc, tgt = r.accuracy(kind), r.target_share(kind)
                w.writerow([r.method, "" if r.budget is None else f"{r.budget:.4f}",
                            "" if not r.feasible else f"{r.tokens_per_layer:.2f}",
                            "" if not r.feasible else f"{r.flops_share:.4f}", k,
                            sum(r.right.values()) if kind is None else r.right.get(k, 0),
                            sum(r.total.values()) if kind is None else r.total.get(k, 0),
                            "" if acc is None else f"{acc:.4f}", "" if tgt is None else f"{tgt:.4f}"])
    doc = {"settings": settings, "results": [
        {"method": r.method, "budget": r.budget, "feasible": r.feasible,
         "visual_tokens_per_layer": None if not r.feasible else r.tokens_per_layer,
         "prefill_flops_share": None if not r.feasible else r.flops_share,
         "accuracy": r.accuracy(), "per_kind": {k: r.accuracy(k) for k in kinds},
         "target_patches_kept": r.target_share(), "correct": r.right, "total": r.total} for r in results]}
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    budgets = sorted({r.budget for r in results if r.budget is not None}, reverse=True)
    curves: dict = {}
    reference = None
    for r in results:
        if r.budget is None:
            reference = (f"{r.method} (all tokens)", r.accuracy() or 0.0)
            continue
        curves.setdefault(r.method, {})[r.budget] = r.accuracy()
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    if curves:
        img = accuracy_plot(budgets, {m: [c.get(b) for b in budgets] for m, c in curves.items()}, reference, title)
        paths["png"] = write_png(out / "accuracy.png", img)
    return paths


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
    """--layers swiftvlm=2:4:6,fastv=2,pdrop=2:6:9"""
    out = {}
    for part in text.split(","):
        name, _, spec = part.partition("=")
        name = name.strip().lower()
        if name not in METHODS[1:] or not spec:
            raise argparse.ArgumentTypeError(f"expected METHOD=L1:L2:... for swiftvlm, fastv or pdrop, got {part!r}")
        try:
            out[name] = tuple(int(v) for v in spec.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integer layers, got {spec!r}") from None
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="an llava-hf checkpoint directory (default: the embedded trained tiny LLaVA)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a dataset folder with questions.jsonl (default: the synthetic held-out set)")
    parser.add_argument("--n", type=_positive, default=1000, help="questions (default 1000)")
    parser.add_argument("--budgets", type=_budgets, default=DEFAULT_BUDGETS,
                        help="shares of the visual tokens per layer (default 0.5,0.333,0.222,0.2)")
    parser.add_argument("--methods", type=_methods, default=METHODS, help="default vanilla,swiftvlm,fastv,pdrop")
    parser.add_argument("--layers", type=_layers, default=None, help="e.g. swiftvlm=2:4:6,fastv=2,pdrop=2:6:9")
    parser.add_argument("--batch-size", type=_positive, default=50)
    parser.add_argument("--max-new-tokens", type=_positive, default=8, help="tokenizer models: answer length")
    parser.add_argument("--out", type=Path, default=Path("swiftvlm-eval"), help="output folder (default swiftvlm-eval)")
    parser.add_argument("--backend", default=None, choices=("auto", "torch", "cpu", "triton", "cuda"),
                        help="swiftvlm op backend (default: auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: torch's)")


def load_model(model_dir: Optional[Path], device="cpu"):
    """The embedded trained tiny LLaVA (None) or a checkpoint directory's model, fp32 on `device`."""
    from .models.llava import LlavaForward
    from .models.tiny import TRAINED_DIR

    path = TRAINED_DIR if model_dir is None else model_dir
    if not (path / "config.json").is_file():
        raise ValueError(f"--model: expected a directory with config.json and model.safetensors, got {path}")
    return LlavaForward.from_pretrained(path, device=device)


def run(args) -> int:
    from .__main__ import require_backend

    device = torch.device(args.device)
    require_backend(args.backend, device.type)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device)
    model.backend = args.backend
    model.eval()
    prompts = prompts_for(args.model, model)
    items = synthetic_items(args.n) if args.data is None else dataset_items(args.data, args.n)
    layers = {**eval_layers(model.num_layers), **(args.layers or {})}
    where = "embedded trained tiny LLaVA" if args.model is None else str(args.model)
    data = "synthetic held-out set (split 1)" if args.data is None else str(args.data)
    print(f"model: {where} ({model.num_visual_tokens} visual tokens, {model.num_layers} layers); data: {data}, "
          f"{len(items)} questions")
    print("layers: " + ", ".join(f"{NAMES[m]} {layers[m]}" for m in args.methods if m != "vanilla"))
    runs = sum(1 if m == "vanilla" else len(args.budgets) for m in args.methods)
    batches = math.ceil(len(items) / args.batch_size)
    progress = Progress(runs * batches)
    results = evaluate(model, items, prompts, args.methods, args.budgets, layers, args.batch_size,
                       args.max_new_tokens, progress, device)
    print(table(results))
    settings = {"model": where, "data": data, "n": len(items), "budgets": list(args.budgets),
                "methods": list(args.methods), "layers": {k: list(v) for k, v in layers.items()},
                "backend": args.backend or "auto", "device": str(device), "torch": torch.__version__}
    title = f"accuracy against visual-token budget ({len(items)} questions)"
    paths = write_outputs(results, args.out, settings, title)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
