"""The evaluation's report: the text table, and results.csv / results.json / results.md /
accuracy.png in the output folder."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from .. import synth
from ..figures import accuracy_plot
from ..png import write_png
from .data import OVERALL
from .run import Result


def kinds_of(results: Sequence[Result]) -> list[str]:
    """The question kinds the results hold, the synthetic set's first: the per-kind columns (a
    question without a kind, OVERALL, counts in the overall column only)."""
    seen: dict = {}
    for r in results:
        for k in r.total:
            if k != OVERALL:
                seen.setdefault(k, None)
    order = [k for k in synth.KINDS if k in seen]
    return order + [k for k in seen if k not in order]


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def table(results: Sequence[Result]) -> str:
    """The results as a fixed-width text table (accuracy in %, per kind and overall)."""
    kinds = kinds_of(results)
    head = ["method", "budget", "tok/layer", "FLOPs", OVERALL] + kinds + ["targets kept"]
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
    names = {"coarse": "background"} if "background" not in kinds else {}  # the synthetic set's coarse question
    head = ["method", "budget", "tokens / layer", "prefill FLOPs", OVERALL] + [names.get(k, k) for k in kinds] + \
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
            for k in [OVERALL] + kinds:
                kind = None if k == OVERALL else k
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
