"""Pruning plans: how many visual tokens each stage keeps and merges, and which layers prune.

A pruning object (`SwiftVLM`, `FastV`, `PDrop`, `ALVTS`) turns (n_vis, num_layers) into a `PruningPlan`,
the list of `Stage`s that the pruning engine (`engine.py`) executes. Layers are numbered from 1, as in the
paper (SwiftVLM, arXiv 2602.03134). This module is pure Python: it imports no torch.

Timing of a stage (docs/CONTRACT.md)
------------------------------------
- A drop-only stage (FastV, PDrop) and the FIRST SwiftVLM stage at layer x score with layer x's own
  query/keys; layer x still runs on every current token and the stage takes effect from layer x + 1.
  Such a stage at the last layer would change nothing, so it must sit in [1, num_layers - 1].
- A SwiftVLM stage s >= 2 at layer y restores the bypassed tokens and re-scores all n_vis visual
  tokens BEFORE layer y; layer y already runs on the kept set, so y may be num_layers.
- An ALVTS stage at layer l selects for that layer only (`PruningPlan.layer_only`): it acts BEFORE
  layer l (its selector scores all n_vis visual tokens on layer l's input), layer l runs on the kept
  set, and the skipped tokens rejoin, unchanged, right after layer l; the next layer sees every token
  again. Nothing is merged (Z = 0) and keep counts are free in [0, n_vis] at every stage.
- A SwiftVLM stage that is not the last merges its R = n_vis - k rest tokens into Z groups, 1 <= Z
  <= R (Z = 0 only when R = 0); the Z merged tokens run with the k kept ones until the next stage.
  The last stage drops its rest (Z = 0). Every stage re-scores all n_vis tokens, so SwiftVLM keep
  counts are free in [0, n_vis]. A drop-only method re-ranks the survivors, so its keep counts are
  non-increasing. A SwiftVLM stage may not drop a non-empty rest before its last stage: that would
  break "all N_v tokens are present again" at the next stage (use PDrop for drop-only schedules).

Visual tokens per layer (`PruningPlan.visual_tokens_per_layer`), for stages (x_s, k_s, Z_s):
n_vis up to the first stage's layer x_1; from the layer where stage s takes effect (x_s + 1 for the
first / drop-only stages, x_s for SwiftVLM stages s >= 2) on, k_s + Z_s. ALVTS: k_s at its layer
x_s only, n_vis at every other layer.

The budget rule (docs/semantics.md, "The SwiftVLM prefill" point 3)
----------------------------------------------------
"Retain T tokens" means: the visual tokens processed per layer (merged tokens counted), averaged
over ALL num_layers layers, equal T. Each method has ONE free integer k; the library takes the k
in [0, n_vis] whose plan's average is closest to T (ties: the smaller k). The average is strictly
increasing in k and moves by less than one token per step, so the chosen plan is within half a
token of T. T outside [average at k = 0, average at k = n_vis] (up to 1e-9 for float rounding)
raises ValueError naming that range (the upper end is n_vis, except for PDrop with ratio < 1).
If neither
`budget` nor `keep` is given, T = n_vis / 3 (the paper's "retain 192 of 576 tokens" setting).

- SwiftVLM: every stage keeps the same k (each stage re-scores all n_vis tokens, so there is no
  reason to shrink), and every non-final stage merges Z = round(merge_ratio * (n_vis - k)) tokens
  (merge_ratio = 0.05 by default: merged tokens stay below 5 % of the rest, cf. the paper's Fig. 7),
  clamped to [1, n_vis - k]; Z = 0 when k = n_vis.
- FastV: its single stage keeps k.
- PDrop: stage s keeps round(k * ratio ** (s - 1)) (ratio = 0.5 by default: each stage halves the
  survivors, PDrop's geometric schedule).
- ALVTS: every selecting layer keeps the same k (each selects afresh from all n_vis tokens); by
  default every layer from 2 on selects (layer 1 runs on all tokens), so the average is
  (n_vis + (L - 1) k) / L and the lowest reachable budget n_vis / L.
round() rounds halves up. Worked example, LLaVA-1.5-7B (32 layers, 576 visual tokens):

  SwiftVLM(layers=(3, 11, 15)), T = 192: k = 144, Z = round(0.05 * 432) = 22.
      layers 1-3: 576, layers 4-14: 144 + 22 = 166, layers 15-32: 144.
      average = (3 * 576 + 11 * 166 + 18 * 144) / 32 = 6146 / 32 = 192.06.
  SwiftVLM(layers=(3, 11, 15)), T = 128: k = 72, Z = round(0.05 * 504) = 25.
      layers 1-3: 576, layers 4-14: 97, layers 15-32: 72; average = 4091 / 32 = 127.84.
      The minimum feasible budget is 63.97 (k = 0, Z = 29).
  FastV(layer=2): T = 192 -> k = 166 (average 191.63); T = 128 -> k = 98 (average 127.88).
  PDrop(layers=(8, 16, 24)): T = 192 -> keep (109, 55, 27) (average 191.75; (110, 55, 28) gives
      192.25, an exact tie, so the smaller k wins); T = 128 is infeasible: the 8 layers before the
      first stage alone average 8 * 576 / 32 = 144 tokens. Feasible: [144, 396] (keep (576, 288,
      144) at the top).

Pruning-layer selection (Sec. 3.2) lives in `selection.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Integral, Real
from typing import Any, Callable, Optional, Sequence

METHODS = ("swiftvlm", "fastv", "pdrop", "alvts")


def as_int(value, name: str, low: int, high: Optional[int] = None) -> int:
    """`value` as an int in [low, high]; a ValueError naming `name` otherwise (bool is no int)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        expected = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an int in {expected}, got {value}")
    return value


def _as_real(value: Any, name: str, low: float, high: float, low_open: bool = False) -> Any:
    """`value` as a finite real in [low, high] ((low, high] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite real number, got {value!r}")
    x: Any = value  # a Real: compared with floats as it is (no rounding to float)
    if x < low or x > high or (low_open and x == low):
        expected = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name}: expected a number in {expected}, got {value}")
    return value


def _as_ints(values, name: str, length: int, low: int = 0) -> tuple[int, ...]:
    """`values` as a tuple of `length` ints >= low."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name}: expected a sequence of {length} ints, got {values!r}")
    if len(values) != length:
        raise ValueError(f"{name}: expected {length} values, got {len(values)}")
    return tuple(as_int(v, f"{name}[{i}]", low) for i, v in enumerate(values))


def _as_layers(layers) -> tuple[int, ...]:
    """`layers` as a non-empty, strictly increasing tuple of 1-indexed layer numbers."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers: expected a non-empty sequence of ints, got {layers!r}")
    out = _as_ints(layers, "layers", len(layers), low=1)
    for a, b in zip(out, out[1:]):
        if b <= a:
            raise ValueError(f"layers: expected strictly increasing layers, got {out}")
    return out


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class Stage:
    """One pruning stage: at 1-indexed `layer`, keep `keep` visual tokens (k_s) and merge the rest
    into `merge` tokens (Z_s); merge = 0 drops the rest."""

    layer: int
    keep: int
    merge: int

    def __post_init__(self):
        object.__setattr__(self, "layer", as_int(self.layer, "Stage.layer", 1))
        object.__setattr__(self, "keep", as_int(self.keep, "Stage.keep", 0))
        object.__setattr__(self, "merge", as_int(self.merge, "Stage.merge", 0))


@dataclass(frozen=True)
class PruningPlan:
    """The stages one prefill executes; validated on construction (see the module docstring)."""

    method: str
    n_vis: int
    num_layers: int
    stages: tuple[Stage, ...]
    bypass: bool
    _at: dict = field(init=False, repr=False, compare=False)  # (layer, acts_before) -> stage, set in __post_init__

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.bypass is not (self.method == "swiftvlm"):
            raise ValueError(f"bypass: expected {self.method == 'swiftvlm'} for method "
                             f"{self.method!r}, got {self.bypass!r}")
        n_vis = as_int(self.n_vis, "n_vis", 1)
        num_layers = as_int(self.num_layers, "num_layers", 1)
        stages = tuple(self.stages) if isinstance(self.stages, Sequence) else None
        if not stages or not all(isinstance(st, Stage) for st in stages):
            raise ValueError(f"stages: expected a non-empty sequence of Stage, got {self.stages!r}")
        object.__setattr__(self, "n_vis", n_vis)
        object.__setattr__(self, "num_layers", num_layers)
        object.__setattr__(self, "stages", stages)
        _as_layers(self.layers)
        for s, st in enumerate(stages):
            where = f"stage {s + 1} (layer {st.layer})"
            top = num_layers if self.acts_before(s) else num_layers - 1
            if st.layer > top:
                raise ValueError(f"layers: {where}: expected a layer in [1, {top}] (a stage that "
                                 f"prunes after its layer must come before the last layer)")
            if st.keep > n_vis:
                raise ValueError(f"keep: {where}: expected at most n_vis = {n_vis}, got {st.keep}")
            if not self.bypass and not self.layer_only(s) and s > 0 and st.keep > stages[s - 1].keep:
                raise ValueError(f"keep: {where}: expected non-increasing keep counts for a "
                                 f"drop-only method, got {st.keep} after {stages[s - 1].keep}")
            rest = n_vis - st.keep
            low, high = (min(1, rest), rest) if self.bypass and s < len(stages) - 1 else (0, 0)
            if not low <= st.merge <= high:
                raise ValueError(f"merge: {where}: expected a merge count in [{low}, {high}] "
                                 f"(rest = {rest}), got {st.merge}")
        object.__setattr__(self, "_at", {(st.layer, self.acts_before(s)): s for s, st in enumerate(stages)})

    @property
    def layers(self) -> tuple[int, ...]:
        """The stages' 1-indexed pruning layers."""
        return tuple(st.layer for st in self.stages)

    # The timing rule, defined here only (the engine, the models and flops.py read it):
    def acts_before(self, s: int) -> bool:
        """True when stage s (0-based) acts BEFORE its layer (a SwiftVLM stage s >= 2: restore the
        bypassed tokens, score with the layer's query and keys, and run the layer on the kept set; an
        ALVTS stage: select with the layer's selector, run the layer on the kept set); False when it
        acts after its layer, with the layer's own query and keys (first and drop-only stages), so
        that the pruning takes effect from the next layer."""
        return (self.bypass and s > 0) or self.layer_only(s)

    def layer_only(self, s: int) -> bool:
        """True when stage s selects for its own layer only (ALVTS): it acts before the layer, the layer
        runs on the kept set, and the skipped tokens rejoin, unchanged, right after the layer (the
        next layer sees every token again)."""
        return self.method == "alvts"

    def effective_layer(self, s: int) -> int:
        """First 1-indexed layer that runs on stage s's tokens."""
        return self.stages[s].layer + (0 if self.acts_before(s) else 1)

    def scored_tokens(self, s: int) -> int:
        """The visual tokens stage s scores: all n_vis at the first stage, at every SwiftVLM stage
        (the bypassed tokens are restored first) and at every ALVTS stage (nothing is lost for good),
        the previous stage's survivors otherwise."""
        if s == 0 or self.bypass or self.layer_only(s):
            return self.n_vis
        return self.stages[s - 1].keep + self.stages[s - 1].merge

    def stage_before(self, layer: int) -> Optional[int]:
        """The stage that acts before 1-indexed `layer`, or None."""
        return self._at.get((layer, True))

    def stage_after(self, layer: int) -> Optional[int]:
        """The stage that acts after 1-indexed `layer`, or None."""
        return self._at.get((layer, False))

    def visual_tokens_per_layer(self) -> list[int]:
        """Visual tokens (kept + merged) each layer 1..num_layers processes."""
        counts = [self.n_vis] * self.num_layers
        for s, st in enumerate(self.stages):
            start = self.effective_layer(s) - 1
            end = start + 1 if self.layer_only(s) else self.num_layers
            counts[start:end] = [st.keep + st.merge] * (end - start)
        return counts

    def average_visual_tokens(self) -> float:
        """The budget measure: visual tokens per layer, averaged over all layers."""
        return sum(self.visual_tokens_per_layer()) / self.num_layers


def _check_budget_or_keep(method) -> None:
    """At most one of budget, budget_ratio and keep; budget / budget_ratio normalised in place."""
    given = [name for name in ("budget", "budget_ratio", "keep") if getattr(method, name) is not None]
    if len(given) > 1:
        raise ValueError(f"{', '.join(given)}: expected at most one of budget, budget_ratio and keep, got {len(given)}")
    if method.budget is not None:
        object.__setattr__(method, "budget", _as_real(method.budget, "budget", 0.0, math.inf))
    if method.budget_ratio is not None:
        object.__setattr__(method, "budget_ratio", _as_real(method.budget_ratio, "budget_ratio", 0.0, 1.0))


def _budget(method, n_vis: int) -> Optional[float]:
    """The budget T for a plan of n_vis visual tokens: budget, or budget_ratio * n_vis (a ragged
    batch's samples each get their share), or None (T = n_vis / 3)."""
    return method.budget if method.budget_ratio is None else method.budget_ratio * n_vis


def _normalise_stages(method) -> tuple[int, ...]:
    """Validate and normalise a multi-stage method's layers, budget and keep in place; its layers."""
    layers = _as_layers(method.layers)
    object.__setattr__(method, "layers", layers)
    _check_budget_or_keep(method)
    if method.keep is not None:
        object.__setattr__(method, "keep", _as_ints(method.keep, "keep", len(layers)))
    return layers


def _fit_budget(method, n_vis: int, num_layers: int, plan_for: Callable[[int], PruningPlan]) -> PruningPlan:
    """The plan_for(k), k in [0, n_vis], whose average visual tokens per layer is closest to the
    method's budget (semantics.md point 3; ties: smaller k). The average is strictly increasing in k."""
    budget = _budget(method, n_vis)
    if budget is None:
        budget = n_vis / 3
    target = Fraction(budget) * num_layers

    def total(k):
        return sum(plan_for(k).visual_tokens_per_layer())

    lowest, highest = total(0), total(n_vis)
    slack = Fraction(num_layers, 10**9)  # a budget computed in floats may miss an end by rounding
    if not lowest - slack <= target <= highest + slack:
        where = f"for layers {plan_for(0).layers}, n_vis = {n_vis}, num_layers = {num_layers}"
        if method.budget_ratio is not None:  # name what the user gave
            raise ValueError(f"budget_ratio: expected a number in [{lowest / num_layers / max(n_vis, 1):.4f}, "
                             f"{highest / num_layers / max(n_vis, 1):.4f}] {where} (a budget of "
                             f"{lowest / num_layers:.2f} to {highest / num_layers:.2f} visual tokens per layer), "
                             f"got {method.budget_ratio}")
        raise ValueError(f"budget: expected a number in [{lowest / num_layers:.2f}, "
                         f"{highest / num_layers:.2f}] {where}, got {budget}")
    lo, hi = 0, n_vis
    while lo < hi:  # smallest k whose total reaches the target
        mid = (lo + hi) // 2
        if total(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and target - total(lo - 1) <= total(lo) - target:
        lo -= 1
    return plan_for(lo)


@dataclass(frozen=True)
class SwiftVLM:
    """SwiftVLM (Sec. 3.3): score, keep k_s, merge the rest into Z_s bypassing tokens (Eq. 10-11),
    restore them before the next stage (Eq. 12-13) and re-score all n_vis tokens there.

    Give `budget` (T, semantics.md point 3), or `keep` (k_s, one per layer) with optional `merge` (Z_s, one
    per non-final stage; default from merge_ratio), or `budget_ratio` (T = budget_ratio * n_vis), or
    none of them (T = n_vis / 3)."""

    layers: tuple[int, ...] = (3, 11, 15)
    budget: Optional[float] = None
    keep: Optional[tuple[int, ...]] = None
    merge: Optional[tuple[int, ...]] = None
    merge_ratio: float = 0.05
    budget_ratio: Optional[float] = None

    def __post_init__(self):
        layers = _normalise_stages(self)
        if self.merge is not None:
            if self.keep is None:
                raise ValueError("merge: expected together with keep (with a budget, merge "
                                 "counts follow merge_ratio)")
            object.__setattr__(self, "merge", _as_ints(self.merge, "merge", len(layers) - 1))
        _as_real(self.merge_ratio, "merge_ratio", 0.0, 1.0, low_open=True)

    def _merge_count(self, rest: int) -> int:
        """Z = round(merge_ratio * R) clamped to [1, R]; 0 when R = 0."""
        return min(rest, max(1, _round_half_up(self.merge_ratio * rest)))

    def _plan(self, n_vis, num_layers, keep, merge) -> PruningPlan:
        stages = tuple(Stage(x, k, z) for x, k, z in zip(self.layers, keep, merge + (0,)))
        return PruningPlan("swiftvlm", n_vis, num_layers, stages, bypass=True)

    def plan(self, n_vis: int, num_layers: int) -> PruningPlan:
        n_vis = as_int(n_vis, "n_vis", 1)
        num_layers = as_int(num_layers, "num_layers", 1)
        if self.keep is not None:
            for s, k in enumerate(self.keep):  # before the default merge counts read n_vis - k
                as_int(k, f"keep[{s}]", 0, n_vis)
            merge = self.merge
            if merge is None:
                merge = tuple(self._merge_count(n_vis - k) for k in self.keep[:-1])
            return self._plan(n_vis, num_layers, self.keep, merge)
        stages = len(self.layers)
        return _fit_budget(self, n_vis, num_layers, lambda k: self._plan(
            n_vis, num_layers, (k,) * stages, (self._merge_count(n_vis - k),) * (stages - 1)))


@dataclass(frozen=True)
class FastV:
    """FastV: one stage; scores at `layer` (default 2), drops all but `keep` visual tokens from
    layer + 1 on. Give `budget`, `keep`, `budget_ratio` (T = budget_ratio * n_vis), or none
    (T = n_vis / 3)."""

    layer: int = 2
    budget: Optional[float] = None
    keep: Optional[int] = None
    budget_ratio: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "layer", as_int(self.layer, "layer", 1))
        _check_budget_or_keep(self)
        if self.keep is not None:
            object.__setattr__(self, "keep", as_int(self.keep, "keep", 0))

    def _plan(self, n_vis, num_layers, k) -> PruningPlan:
        return PruningPlan("fastv", n_vis, num_layers, (Stage(self.layer, k, 0),), bypass=False)

    def plan(self, n_vis: int, num_layers: int) -> PruningPlan:
        n_vis = as_int(n_vis, "n_vis", 1)
        num_layers = as_int(num_layers, "num_layers", 1)
        if self.keep is not None:
            return self._plan(n_vis, num_layers, self.keep)
        return _fit_budget(self, n_vis, num_layers,
                           lambda k: self._plan(n_vis, num_layers, k))


@dataclass(frozen=True)
class PDrop:
    """PDrop: drop-only stages at `layers` (default 8, 16, 24), survivors re-ranked at each stage.
    Give `budget` (stage s keeps round(k * ratio ** (s - 1))), `keep` (non-increasing, one per
    layer), `budget_ratio` (T = budget_ratio * n_vis), or none (T = n_vis / 3).

    official=False (default): the library's timing (semantics.md: a stage at layer x scores with layer x's
    own query and keys on layer x's input; every token keeps its position id). official=True: as
    PDrop's official code does it (the variant behind the PDrop paper's numbers): the stage at layer
    x scores with layer x + 1's query and keys (its input norm, projections and RoPE) on layer x's
    output, and after a drop the positions are renumbered (each token's position id minus the
    visual tokens dropped before it; decoding continues from the renumbered positions). The plan
    (keep counts, timing, budget) is the same for both. Only `swiftvlm_kernels.hf` runs the
    official variant (1-D RoPE models: LLaVA, LLaVA-NeXT); the minimal LLaVA forward refuses it."""

    layers: tuple[int, ...] = (8, 16, 24)
    budget: Optional[float] = None
    keep: Optional[tuple[int, ...]] = None
    ratio: float = 0.5
    budget_ratio: Optional[float] = None
    official: bool = False

    def __post_init__(self):
        _normalise_stages(self)
        _as_real(self.ratio, "ratio", 0.0, 1.0, low_open=True)
        if not isinstance(self.official, bool):
            raise ValueError(f"official: expected a bool, got {self.official!r}")

    def _plan(self, n_vis, num_layers, keep) -> PruningPlan:
        stages = tuple(Stage(x, k, 0) for x, k in zip(self.layers, keep))
        return PruningPlan("pdrop", n_vis, num_layers, stages, bypass=False)

    def plan(self, n_vis: int, num_layers: int) -> PruningPlan:
        n_vis = as_int(n_vis, "n_vis", 1)
        num_layers = as_int(num_layers, "num_layers", 1)
        if self.keep is not None:
            return self._plan(n_vis, num_layers, self.keep)
        return _fit_budget(self, n_vis, num_layers, lambda k: self._plan(
            n_vis, num_layers,
            tuple(_round_half_up(k * self.ratio ** s) for s in range(len(self.layers)))))


@dataclass(frozen=True)
class ALVTS:
    """ALVTS (adaptive layer-wise visual token selection, docs/semantics.md "ALVTS"): before each
    selecting layer, a cheap low-rank selector scores ALL n_vis visual tokens on the layer's input and
    keeps k of them; the layer runs on the text and those k tokens, and the others skip the layer
    (their states pass unchanged) and rejoin right after it. Nothing is lost for good: the next layer
    chooses again from every visual token.

    layers: the selecting layers (default: every layer from 2 on; layer 1 runs on all tokens).
    Give `budget` (T: visual tokens processed per layer, averaged over all layers; the same k at every
    selecting layer), `budget_ratio` (T = budget_ratio * n_vis), `keep` (an int: k at every selecting
    layer; or one count per layer of `layers`), or none (T = n_vis / 3).
    rank: the rank R of the default selector (a truncated SVD of each layer's query-key form,
    `pruning.selector`; default 128, at most the hidden size). selector: a `pruning.selector.Selector`
    (for instance calibrated, or `Selector.load(path)`) used instead; not together with rank."""

    budget: Optional[float] = None
    budget_ratio: Optional[float] = None
    layers: Optional[tuple[int, ...]] = None
    keep: Any = None
    rank: Optional[int] = None
    selector: Any = None

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", _as_layers(self.layers))
        _check_budget_or_keep(self)
        if self.keep is not None and not isinstance(self.keep, Integral):
            if self.layers is None:
                raise ValueError("keep: per-layer keep counts need `layers` (one count per selecting layer); "
                                 "an int keeps the same count at every selecting layer")
            object.__setattr__(self, "keep", _as_ints(self.keep, "keep", len(self.layers)))
        elif self.keep is not None:
            object.__setattr__(self, "keep", as_int(self.keep, "keep", 0))
        if self.rank is not None:
            object.__setattr__(self, "rank", as_int(self.rank, "rank", 1))
            if self.selector is not None:
                raise ValueError("rank, selector: expected at most one of them (rank sets the default selector's "
                                 "rank; a given selector has its own)")
        if self.selector is not None and not callable(getattr(self.selector, "projection", None)):
            raise ValueError(f"selector: expected a swiftvlm_kernels.pruning.selector.Selector (or None: the "
                             f"default SVD selector), got {type(self.selector).__name__}")

    def selecting_layers(self, num_layers: int) -> tuple[int, ...]:
        """The selecting layers of a model of num_layers layers: `layers`, or 2..num_layers."""
        if self.layers is not None:
            return self.layers
        if num_layers < 2:
            raise ValueError(f"layers: ALVTS selects from layer 2 on by default (layer 1 runs on all tokens); a "
                             f"model of {num_layers} layer has none: give layers")
        return tuple(range(2, num_layers + 1))

    def _plan(self, n_vis, num_layers, layers, keep) -> PruningPlan:
        return PruningPlan("alvts", n_vis, num_layers, tuple(Stage(x, k, 0) for x, k in zip(layers, keep)),
                           bypass=False)

    def plan(self, n_vis: int, num_layers: int) -> PruningPlan:
        n_vis = as_int(n_vis, "n_vis", 1)
        num_layers = as_int(num_layers, "num_layers", 1)
        layers = self.selecting_layers(num_layers)
        if self.keep is not None:
            keep = (self.keep,) * len(layers) if isinstance(self.keep, int) else self.keep
            for s, k in enumerate(keep):
                as_int(k, f"keep[{s}]" if len(keep) > 1 else "keep", 0, n_vis)
            return self._plan(n_vis, num_layers, layers, keep)
        return _fit_budget(self, n_vis, num_layers,
                           lambda k: self._plan(n_vis, num_layers, layers, (k,) * len(layers)))


@dataclass(frozen=True)
class RaggedPlan:
    """The plans of a ragged batch, one PruningPlan per sample (each for its own n_vis), run as one
    batch: the samples share the method, the layers and so the timing; each stage's keep and merge
    counts are per sample, and the batch's tensors are padded to the widest (`stages`).

    `RaggedPlan.for_counts(method, n_vis_per_sample, num_layers)` gives every sample the plan the
    method gives it alone: with `budget_ratio` (or no budget: T = n_vis / 3) each sample keeps its
    share of its own visual tokens; with `budget` or `keep` every sample gets the same T or k.
    Or build one from explicit per-sample plans: `RaggedPlan((plan_0, plan_1, ...))`."""

    plans: tuple[PruningPlan, ...]

    def __post_init__(self):
        plans = tuple(self.plans) if isinstance(self.plans, Sequence) else None
        if not plans or not all(isinstance(p, PruningPlan) for p in plans):
            raise ValueError(f"plans: expected a non-empty sequence of PruningPlan (one per sample), got {self.plans!r}")
        first = plans[0]
        for b, p in enumerate(plans):
            if (p.method, p.num_layers, p.layers) != (first.method, first.num_layers, first.layers):
                raise ValueError(f"plans: sample {b}'s plan ({p.method}, num_layers = {p.num_layers}, layers "
                                 f"{p.layers}) differs from sample 0's ({first.method}, {first.num_layers}, "
                                 f"{first.layers}); a ragged batch shares method and layers")
        object.__setattr__(self, "plans", plans)
        widths = tuple(Stage(st.layer, max(p.stages[s].keep for p in plans), max(p.stages[s].merge for p in plans))
                       for s, st in enumerate(first.stages))
        object.__setattr__(self, "stages", widths)

    @classmethod
    def for_counts(cls, method, n_vis: Sequence, num_layers: int) -> "RaggedPlan":
        """Each sample's plan from `method.plan(n_vis[b], num_layers)`."""
        if isinstance(n_vis, (str, bytes)) or not isinstance(n_vis, Sequence) or not n_vis:
            raise ValueError(f"n_vis: expected a non-empty sequence of per-sample visual-token counts, got {n_vis!r}")
        return cls(tuple(method.plan(n, num_layers) for n in n_vis))

    # what the engine and the models read, as of a PruningPlan (stages: the padded widths)
    method = property(lambda self: self.plans[0].method)
    bypass = property(lambda self: self.plans[0].bypass)
    num_layers = property(lambda self: self.plans[0].num_layers)
    layers = property(lambda self: self.plans[0].layers)
    n_vis = property(lambda self: max(p.n_vis for p in self.plans))

    def acts_before(self, s: int) -> bool:
        return self.plans[0].acts_before(s)

    def layer_only(self, s: int) -> bool:
        return self.plans[0].layer_only(s)

    def effective_layer(self, s: int) -> int:
        return self.plans[0].effective_layer(s)

    def stage_before(self, layer: int) -> Optional[int]:
        return self.plans[0].stage_before(layer)

    def stage_after(self, layer: int) -> Optional[int]:
        return self.plans[0].stage_after(layer)

    def n_vis_per_sample(self) -> tuple[int, ...]:
        return tuple(p.n_vis for p in self.plans)

    def counts(self, s: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Stage s's per-sample (keep counts, merge counts)."""
        return tuple(p.stages[s].keep for p in self.plans), tuple(p.stages[s].merge for p in self.plans)

    def scored_widths(self, s: int) -> int:
        """The padded width of the visual tokens stage s scores."""
        return max(p.scored_tokens(s) for p in self.plans)


def check_pruning(pruning) -> None:
    """ValueError unless `pruning` is a PruningPlan, a RaggedPlan or a pruning method (has `.plan`)."""
    if not isinstance(pruning, (PruningPlan, RaggedPlan)) and not callable(getattr(pruning, "plan", None)):
        raise ValueError(f"pruning: expected None, a PruningPlan, a RaggedPlan or a pruning method such as "
                         f"SwiftVLM(), FastV(), PDrop() or ALVTS(), got {type(pruning).__name__} {pruning!r}")


def plan_for_counts(pruning, counts: Sequence[int], num_layers: int):
    """The plan a model of `num_layers` layers executes for `pruning` (a pruning method such as
    SwiftVLM(), a PruningPlan or a RaggedPlan) on samples with these visual-token counts: a
    RaggedPlan when the counts differ.

    Raises
    ------
    ValueError
        a PruningPlan or RaggedPlan made for other counts or another depth (naming `pruning`).
    """
    counts = list(counts)
    if isinstance(pruning, RaggedPlan):
        plan, want = pruning, list(pruning.n_vis_per_sample())
    elif isinstance(pruning, PruningPlan):
        plan, want = pruning, [pruning.n_vis] * len(counts)
    else:
        plan = (RaggedPlan.for_counts(pruning, counts, num_layers) if len(set(counts)) > 1
                else pruning.plan(counts[0], num_layers))
        want = counts
    if want != counts or plan.num_layers != num_layers:
        ragged = len(set(counts)) > 1
        raise ValueError(f"pruning: the plan is for n_vis = {want if len(set(want)) > 1 else want[0]}, "
                         f"num_layers = {plan.num_layers}; these inputs have "
                         f"{counts if ragged else counts[0]} visual tokens per sample and the model "
                         f"{num_layers} layers")
    return plan

