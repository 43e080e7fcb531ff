"""The evaluation's report: the text tables (accuracy with its 95 % interval; paired differences
with theirs), and results.csv / differences.csv / results.json / results.md / accuracy.png in the
output folder."""
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
from .run import Result, paired_differences
from .stats import Difference


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


def _span(interval: Optional[tuple[float, float]], signed: bool = False) -> str:
    """An interval in % (points when `signed`): "49.7-55.9", or "-1.2 to +0.3"."""
    if interval is None:
        return "n/a"
    lo, hi = (100 * v for v in interval)
    return f"{lo:+.1f} to {hi:+.1f}" if signed else f"{lo:.1f}-{hi:.1f}"


def _budget(b: Optional[float], space: str = "") -> str:
    return f"100{space}%" if b is None else f"{100 * b:.0f}{space}%"


CI = "95% CI"  # the interval columns' name
INTERVALS = ("95 %: accuracies: Wilson score interval; differences: paired, on the same questions, mean of the "
             "per-question differences (right 1, wrong 0) +- 1.96 sample standard deviations / sqrt(n)")


def _fixed(rows: list) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _difference_rows(diffs: Sequence[Difference]) -> list:
    return [[_budget(d.a_budget), d.a, d.b,
             f"{100 * d.difference:+.1f}", _span((d.low, d.high), signed=True), str(d.n)] for d in diffs]


DIFFERENCE_HEAD = ["budget", "A", "B", "A - B", CI, "questions"]
DIFFERENCE_NOTE = ("paired differences in accuracy (points): A - B on the same questions, 95% CI of the mean "
                   "per-question difference")


def table(results: Sequence[Result]) -> str:
    """The results as fixed-width text tables: accuracy in % per kind and overall, the overall
    accuracy's 95 % Wilson interval beside it; then the paired differences (points) against the
    unpruned model and between the methods at each budget, with their 95 % intervals."""
    kinds = kinds_of(results)
    head = ["method", "budget", "tok/layer", "FLOPs", OVERALL, CI] + kinds + ["targets kept"]
    rows = [head]
    for r in results:
        rows.append([r.method, _budget(r.budget),
                     "n/a" if not r.feasible else f"{r.tokens_per_layer:.1f}",
                     "n/a" if not r.feasible else f"{100 * r.flops_share:.0f}%", _pct(r.accuracy()),
                     _span(r.interval())] + [_pct(r.accuracy(k)) for k in kinds] + [_pct(r.target_share())])
    out = _fixed(rows)
    diffs = paired_differences(results)
    if diffs:
        out += "\n\n" + DIFFERENCE_NOTE + "\n" + _fixed([DIFFERENCE_HEAD] + _difference_rows(diffs))
    return out


def markdown_table(results: Sequence[Result]) -> str:
    """The results as a Markdown table (accuracy in %), the form the README quotes."""
    kinds = kinds_of(results)
    names = {"coarse": "background"} if "background" not in kinds else {}  # the synthetic set's coarse question
    head = ["method", "budget", "tokens / layer", "prefill FLOPs", OVERALL, "95 % CI"] + \
        [names.get(k, k) for k in kinds] + ["targets kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.method, _budget(r.budget, " "),
                 "n/a" if not r.feasible else f"{r.tokens_per_layer:.1f}",
                 "n/a" if not r.feasible else f"{100 * r.flops_share:.0f} %", _pct(r.accuracy()), _span(r.interval())]
        cells += [_pct(r.accuracy(k)) for k in kinds] + [_pct(r.target_share())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_differences(results: Sequence[Result]) -> str:
    """The paired differences (see `table`) as a Markdown table; empty without any."""
    rows = _difference_rows(paired_differences(results))
    if not rows:
        return ""
    head = ["budget", "A", "B", "A - B (points)", "95 % CI", "questions"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _pair(interval: Optional[tuple[float, float]]) -> Optional[list]:
    return None if interval is None else [round(interval[0], 6), round(interval[1], 6)]


def _difference_doc(d: Difference) -> dict:
    return {"a": d.a, "a_budget": d.a_budget, "b": d.b, "b_budget": d.b_budget, "questions": d.n,
            "difference": round(d.difference, 6), "ci": [round(d.low, 6), round(d.high, 6)]}


def write_outputs(results: Sequence[Result], out: Path, settings: dict, title: str) -> dict:
    """results.csv, differences.csv, results.json, results.md, accuracy.png and (with the unpruned
    run) differences.png under `out`; returns their paths. Every accuracy carries its 95 % Wilson
    interval, every difference its paired 95 % interval (per kind too in the CSV and JSON): error
    bars on the plots (differences.png: each pruned run minus vanilla on the same questions)."""
    out.mkdir(parents=True, exist_ok=True)
    diffs_md = markdown_differences(results)
    (out / "results.md").write_text(markdown_table(results) + (
        f"\n{DIFFERENCE_NOTE[0].upper() + DIFFERENCE_NOTE[1:]}:\n\n{diffs_md}" if diffs_md else ""))
    kinds = kinds_of(results)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "budget", "visual_tokens_per_layer", "prefill_flops_share", "kind", "correct", "total",
                    "accuracy", "accuracy_ci_low", "accuracy_ci_high", "target_patches_kept_share"])
        for r in results:
            for k in [OVERALL] + kinds:
                kind = None if k == OVERALL else k
                acc, tgt, ci = r.accuracy(kind), r.target_share(kind), r.interval(kind)
                w.writerow([r.method, "" if r.budget is None else f"{r.budget:.4f}",
                            "" if not r.feasible else f"{r.tokens_per_layer:.2f}",
                            "" if not r.feasible else f"{r.flops_share:.4f}", k,
                            sum(r.right.values()) if kind is None else r.right.get(k, 0),
                            sum(r.total.values()) if kind is None else r.total.get(k, 0),
                            "" if acc is None else f"{acc:.4f}", "" if ci is None else f"{ci[0]:.4f}",
                            "" if ci is None else f"{ci[1]:.4f}", "" if tgt is None else f"{tgt:.4f}"])
    by_kind = {k: paired_differences(results, None if k == OVERALL else k) for k in [OVERALL] + kinds}
    with (out / "differences.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "a", "a_budget", "b", "b_budget", "questions", "difference", "ci_low", "ci_high"])
        for k, diffs in by_kind.items():
            for d in diffs:
                w.writerow([k, d.a, "" if d.a_budget is None else f"{d.a_budget:.4f}", d.b,
                            "" if d.b_budget is None else f"{d.b_budget:.4f}", d.n, f"{d.difference:.4f}",
                            f"{d.low:.4f}", f"{d.high:.4f}"])
    doc = {"settings": settings, "intervals": INTERVALS, "results": [
        {"method": r.method, "budget": r.budget, "feasible": r.feasible,
         "visual_tokens_per_layer": None if not r.feasible else r.tokens_per_layer,
         "prefill_flops_share": None if not r.feasible else r.flops_share,
         "accuracy": r.accuracy(), "accuracy_ci": _pair(r.interval()), "per_kind": {k: r.accuracy(k) for k in kinds},
         "per_kind_ci": {k: _pair(r.interval(k)) for k in kinds},
         "target_patches_kept": r.target_share(), "correct": r.right, "total": r.total,
         "outcomes": "".join(str(v) for v in r.outcomes)} for r in results],
        "paired_differences": {k: [_difference_doc(d) for d in diffs] for k, diffs in by_kind.items()}}
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    budgets = sorted({r.budget for r in results if r.budget is not None}, reverse=True)
    curves: dict = {}
    bars: dict = {}
    reference, reference_ci = None, None
    for r in results:
        if r.budget is None:
            reference, reference_ci = (f"{r.method} (all tokens)", r.accuracy() or 0.0), r.interval()
            continue
        curves.setdefault(r.method, {})[r.budget] = r.accuracy()
        bars.setdefault(r.method, {})[r.budget] = r.interval()
    paths = {"csv": out / "results.csv", "differences": out / "differences.csv", "json": out / "results.json",
             "md": out / "results.md"}
    if curves:
        img = accuracy_plot(budgets, {m: [c.get(b) for b in budgets] for m, c in curves.items()}, reference, title,
                            intervals={m: [c.get(b) for b in budgets] for m, c in bars.items()},
                            reference_interval=reference_ci)
        paths["png"] = write_png(out / "accuracy.png", img)
    against = [d for d in by_kind[OVERALL] if d.b_budget is None]  # every pruned run against vanilla
    if against:
        lows, highs = [min(0.0, d.low) for d in against], [max(0.0, d.high) for d in against]
        pad = max(0.01, 0.08 * (max(highs) - min(lows)))
        values = {m: {d.a_budget: d for d in against if d.a == m} for m in curves}
        img = accuracy_plot(budgets, {m: [v[b].difference if b in v else None for b in budgets] for m, v in values.items()},
                            (f"{against[0].b} (0)", 0.0), f"accuracy minus {against[0].b}'s on the same {against[0].n} questions",
                            intervals={m: [(v[b].low, v[b].high) if b in v else None for b in budgets]
                                       for m, v in values.items()},
                            y_range=(min(lows) - pad, max(highs) + pad), ylabel="points",
                            interval_note="paired 95% CI")
        paths["differences_png"] = write_png(out / "differences.png", img)
    return paths
