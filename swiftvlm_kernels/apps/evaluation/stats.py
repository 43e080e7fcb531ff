"""The evaluation's uncertainty: a 95 % Wilson score interval on every accuracy, and paired
differences between two runs on the same questions with the normal interval of the mean of the
per-question differences. Both are closed-form: the same outcomes give the same intervals on every
machine (no resampling, no seed)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: two-sided 95 %


def wilson(right: int, total: int, z: float = Z95) -> Optional[tuple[float, float]]:
    """The Wilson score interval (low, high) of a proportion right / total; None when total is 0.
    Unlike the normal interval it stays inside [0, 1] and is not empty at 0 or `total` right."""
    if total <= 0:
        return None
    if not 0 <= right <= total:
        raise ValueError(f"right: expected a count in [0, {total}], got {right}")
    p = right / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z / (1 + z2 / total) * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Difference:
    """Accuracy of `a` minus accuracy of `b` on the same `n` questions, with its 95 % interval
    (shares, not points). `a_budget` / `b_budget`: None for the unpruned model."""
    a: str
    a_budget: Optional[float]
    b: str
    b_budget: Optional[float]
    n: int
    difference: float
    low: float
    high: float


def paired_interval(a: Sequence[int], b: Sequence[int], z: float = Z95) -> Optional[tuple[float, float, float]]:
    """(mean, low, high) of the per-question differences a_i - b_i (each outcome 0 or 1, the same
    questions in the same order): the mean with the normal interval mean +- z * sd / sqrt(n), sd
    the differences' sample standard deviation. Pairing removes what the questions share (most
    questions are answered alike by both), so the interval is far narrower than the one two
    unpaired accuracies would give. None without questions; (d, d, d) when every difference is the
    same (no evidence of spread, e.g. two runs that agree everywhere)."""
    if len(a) != len(b):
        raise ValueError(f"b: expected outcomes for the same {len(a)} questions as a, got {len(b)}")
    n = len(a)
    if n == 0:
        return None
    d = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    if n == 1:
        return mean, mean, mean
    var = sum((v - mean) ** 2 for v in d) / (n - 1)
    half = z * math.sqrt(var / n)
    return mean, max(-1.0, mean - half), min(1.0, mean + half)
