"""The methods and the evaluation loop: every method at every budget answers the same questions
(see the package docstring); a Result per method and budget, with every question's outcome kept
so that two runs can be compared question by question (`paired_differences`)."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from ...pruning import ALVTS, FastV, PDrop, SwiftVLM, prefill_flops
from .data import Item, target_patches
from .prompts import batch_inputs, normalise, prompt_ids
from .stats import Difference, paired_interval, wilson

DEFAULT_BUDGETS = (0.5, 1 / 3, 2 / 9, 0.2)
METHODS = ("vanilla", "swiftvlm", "fastv", "pdrop", "alvts")
NAMES = {"vanilla": "vanilla", "swiftvlm": "SwiftVLM", "fastv": "FastV", "pdrop": "PDrop", "alvts": "ALVTS"}


@dataclass
class Result:
    """One method at one budget: correct answers and target patches kept, per question kind, and
    each question's outcome (1 right, 0 wrong) and kind in the order the questions were asked."""
    method: str
    budget: Optional[float]
    tokens_per_layer: float
    flops_share: float
    right: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)
    target_kept: dict = field(default_factory=dict)
    target_total: dict = field(default_factory=dict)
    feasible: bool = True
    outcomes: list = field(default_factory=list)
    question_kinds: list = field(default_factory=list)

    @property
    def label(self) -> str:
        """The method and its budget, e.g. "SwiftVLM 33%" ("vanilla" unpruned)."""
        return self.method if self.budget is None else f"{self.method} {100 * self.budget:.0f}%"

    def interval(self, kind: Optional[str] = None) -> Optional[tuple[float, float]]:
        """The 95 % Wilson interval of accuracy(kind); None where accuracy(kind) is None."""
        if not self.feasible:
            return None
        r = sum(self.right.values()) if kind is None else self.right.get(kind, 0)
        t = sum(self.total.values()) if kind is None else self.total.get(kind, 0)
        return wilson(r, t)

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


def eval_layers(num_layers: int) -> dict:
    """Default layers per method for a decoder of num_layers (see the package docstring)."""
    from ...hf import default_layers

    pdrop = tuple(sorted({2, *(max(3, min(num_layers - 1, round(num_layers * f))) for f in (0.5, 0.75))}))
    return {"swiftvlm": default_layers(num_layers, "swiftvlm"), "fastv": (2,), "pdrop": pdrop,
            "alvts": default_layers(num_layers, "alvts")}


def check_layers(layers: dict, model, option: str = "layers") -> None:
    """ValueError naming `option` (and the method's layers) when a method's layers (name -> layers)
    make no plan for the model: ints >= 1, increasing, one for FastV, within the model's depth."""
    for name, values in layers.items():
        spec = f"{option} {name}={':'.join(str(v) for v in values)}"
        if name == "fastv" and len(values) != 1:
            raise ValueError(f"{spec}: expected one layer for FastV")
        keep = model.num_visual_tokens  # every stage keeping every token: a refusal is the layers'
        try:
            method = make_method(name, 1.0, values)
            replace(method, budget_ratio=None, keep=keep if name == "fastv" else (keep,) * len(values)).plan(
                model.num_visual_tokens, model.num_layers)
        except ValueError as e:
            raise ValueError(f"{spec}: expected layers that fit the model's {model.num_layers} layers ({e})") from None


def make_method(name: str, budget: float, layers: Sequence[int], selector=None):
    """The pruning object of `name` at `budget` (a share of the visual tokens) and `layers`; ALVTS with
    `selector` (None: the default SVD selector)."""
    if name == "alvts":
        return ALVTS(layers=tuple(layers), budget_ratio=budget, selector=selector)
    if name == "swiftvlm":
        return SwiftVLM(layers=tuple(layers), budget_ratio=budget)
    if name == "fastv":
        return FastV(layer=layers[0], budget_ratio=budget)
    if name == "pdrop":
        return PDrop(layers=tuple(layers), budget_ratio=budget)
    raise ValueError(f"--methods: expected names from {', '.join(METHODS)}, got {name!r}")


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
             dtype=torch.float32, selector=None) -> list[Result]:
    """Every method at every budget (vanilla once) on `items`; see the package docstring. The
    layers and every prompt are checked before anything runs; then each batch's inputs are built
    once (its images read one at a time) and every method and budget answers it. selector: ALVTS'
    (None: the default SVD selector). "Targets kept": the share of the answers' patches in the last
    stage's kept set; for ALVTS, whose layers each keep their own set, the mean over its layers."""
    layers = {**eval_layers(model.num_layers), **(layers or {})}
    check_layers({m: layers[m] for m in methods if m != "vanilla"}, model)
    text = model.text_config
    grid = int(round(math.sqrt(model.num_visual_tokens - model.keep_cls)))
    new_tokens = 0 if prompts.one_token else max_new_tokens
    lengths = [len(prompt_ids(it, prompts, model, new_tokens)) for it in items]
    # the FLOPs share is reported for the questions' mean prompt length
    n_text = round(sum(lengths) / max(1, len(items))) - model.num_visual_tokens
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    results, running = [], []
    for method, budget in [(m, None) if m == "vanilla" else (m, b)
                           for m in methods for b in ((None,) if m == "vanilla" else budgets)]:
        pruning = None
        try:
            pruning = None if budget is None else make_method(method, budget, layers[method], selector)
            plan = model.plan_for(pruning)
        except ValueError:  # a budget below what the method's layers allow
            results.append(Result(NAMES[method], budget, float("nan"), float("nan"), feasible=False))
            if progress:
                progress.update(len(batches), f"{NAMES[method]} {budget:.0%}: n/a")
            continue
        flops = prefill_flops(text, n_text, model.num_visual_tokens, pruning).total / \
            prefill_flops(text, n_text, model.num_visual_tokens).total
        per_layer = plan.average_visual_tokens() if plan else float(model.num_visual_tokens)
        results.append(Result(NAMES[method], budget, per_layer, flops))
        running.append((pruning, results[-1], NAMES[method] if budget is None else f"{NAMES[method]} {budget:.0%}"))
    for batch in batches:
        inp = batch_inputs(batch, prompts, model, device, dtype)
        targets = [target_patches(it, (it.image.shape[1], it.image.shape[2]), grid) for it in batch]
        for pruning, res, label in running:
            pred, kept = _predict(model, prompts, inp, pruning, max_new_tokens)
            for b, it in enumerate(batch):
                if prompts.one_token:
                    ok = pred[b] == prompts.answer_id(it.answer)
                else:
                    ok = normalise(pred[b]) == normalise(it.answer)
                res.outcomes.append(int(ok))
                res.question_kinds.append(it.kind)
                res.right[it.kind] = res.right.get(it.kind, 0) + int(ok)
                res.total[it.kind] = res.total.get(it.kind, 0) + 1
                if len(targets[b]):
                    sets = [k[b] for k in (kept if isinstance(pruning, ALVTS) else kept[-1:])] or \
                        [torch.arange(model.num_visual_tokens)]
                    hit = sum(torch.isin(targets[b].to(ks.device), ks).sum().item() for ks in sets)
                    res.target_kept[it.kind] = res.target_kept.get(it.kind, 0) + hit
                    res.target_total[it.kind] = res.target_total.get(it.kind, 0) + len(targets[b]) * len(sets)
            if progress:
                progress.update(1, label)
    return results


def paired_differences(results: Sequence[Result], kind: Optional[str] = None) -> list[Difference]:
    """Accuracy differences on the same questions (of `kind`; None: all), with their paired 95 %
    intervals (stats.paired_interval): every pruned run against the unpruned one ("vanilla"), then,
    at each budget, every pair of methods in the order they ran. Infeasible runs are left out."""
    runs = [r for r in results if r.feasible and r.outcomes]
    pairs = [(r, v) for v in runs if v.budget is None for r in runs if r.budget is not None]
    budgets = sorted({r.budget for r in runs if r.budget is not None}, reverse=True)
    for b in budgets:
        same = [r for r in runs if r.budget == b]
        pairs += [(x, y) for i, x in enumerate(same) for y in same[i + 1:]]
    out = []
    for x, y in pairs:
        if x.question_kinds != y.question_kinds:
            raise ValueError(f"{x.label} and {y.label}: expected outcomes on the same questions")
        keep = [i for i, k in enumerate(x.question_kinds) if kind is None or k == kind]
        got = paired_interval([x.outcomes[i] for i in keep], [y.outcomes[i] for i in keep])
        if got is not None:
            out.append(Difference(x.method, x.budget, y.method, y.budget, len(keep), *got))
    return out
