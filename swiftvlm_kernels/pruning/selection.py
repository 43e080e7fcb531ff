"""Pruning-layer selection (paper Sec. 3.2): the layer-wise profile x_1..x_L (Eq. 3) and the dynamic
programme of Eq. 3-9 that picks the pruning layers from it.

For every layer i, the paper keeps the text and image inputs, keeps all tokens in layers 1-2 and,
from layer 3 on, only the top V% visual tokens that layer i selects in the vanilla forward; x_i is
the task metric of that run. Here a run is a forward (or greedy generation) with one drop-only stage
at layer 2 whose selection is layer i's vanilla T-V scores (`stage_scores`).
"""
from __future__ import annotations

import importlib
import warnings
from fractions import Fraction
from typing import Callable, Iterable, Mapping, Optional, Sequence

from .plan import PruningPlan, Stage, as_int


def layer_profile(model, samples: Iterable[Mapping], metric: Callable[[Mapping, object], float], *,
                  keep_ratio: float = 0.25, max_new_tokens: Optional[int] = None) -> list[float]:
    """[x_1, ..., x_L]: the mean of metric(sample, output) over `samples` when layer i's top
    keep_ratio visual tokens are the only ones kept from layer 3 on (Eq. 3).

    samples: mappings with input_ids, pixel_values and optionally attention_mask (any batch size).
    output: the run's LlavaOutput, or its generated ids [B, max_new_tokens] when max_new_tokens is given.
    model: a LlavaForward (the minimal forward), or anything with its interface (num_visual_tokens,
    num_layers, forward / generate with pruning= and stage_scores=).
    Layer i's selection uses its own query/keys on its vanilla input (the tokens' T-V scores).

    A transformers model (no `num_visual_tokens`) is deprecated here: call
    `swiftvlm_kernels.hf.layer_profile` (same definition; HF's outputs: ModelOutput, or generate's
    ids). Such a call still works: it warns (DeprecationWarning) and hands the model to
    `swiftvlm_kernels.hf.layer_profile`, looked up at run time (importlib) because the pruning core
    does not import its integrations (`swiftvlm_kernels.hf` imports pruning, never the reverse).
    """
    if not hasattr(model, "num_visual_tokens"):  # a transformers model: swiftvlm_kernels.hf runs the profile
        warnings.warn("swiftvlm_kernels.pruning.layer_profile on a transformers model is deprecated; call "
                      "swiftvlm_kernels.hf.layer_profile(model, samples, metric, ...) instead",
                      DeprecationWarning, stacklevel=2)
        hf = importlib.import_module("..hf", __package__)
        return hf.layer_profile(model, samples, metric, keep_ratio=keep_ratio, max_new_tokens=max_new_tokens)
    n_vis, num_layers = model.num_visual_tokens, model.num_layers
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio: expected a fraction in (0, 1], got {keep_ratio!r}")
    if num_layers < 3:
        raise ValueError(f"model: the profile keeps layers 1-2 whole, so it needs at least 3 layers, got {num_layers}")
    keep = max(1, round(keep_ratio * n_vis))
    plan = PruningPlan("fastv", n_vis, num_layers, (Stage(2, keep, 0),), bypass=False)  # effective from layer 3
    totals, count = [0.0] * num_layers, 0
    for sample in samples:
        args = (sample["input_ids"], sample["pixel_values"], sample.get("attention_mask"))
        vanilla = model(*args, output_scores=True)
        for i, scores in enumerate(vanilla.layer_scores):
            if max_new_tokens is None:
                output = model(*args, pruning=plan, stage_scores=[scores])
            else:
                output = model.generate(*args, pruning=plan, max_new_tokens=max_new_tokens, stage_scores=[scores])
            totals[i] += float(metric(sample, output))
        count += 1
    if count == 0:
        raise ValueError("samples: expected at least one sample")
    return [total / count for total in totals]


def select_pruning_layers(profile: Sequence[float], m: int) -> list[int]:
    """Pruning-layer selection of Sec. 3.2 (Eq. 3-9) by dynamic programming, O(L^2 m).

    profile: x_1..x_L (Eq. 3; index 0 is layer 1), the layer-wise performance when each layer's
    top visual tokens are kept from layer 3 on. Returns at most m 1-indexed layers
    i_1 < ... < i_K, each >= 3 (layers 1-2 are excluded as in the paper), whose x values strictly
    increase and start above x_2, maximising Eq. 7:
        P = sum_{k=0..K} x_{i_k} (i_{k+1} - i_k) / (L - 2),  i_0 = 2, i_{K+1} = L.
    Equivalently (Eq. 8, each update lifts the level from x_{i_{k-1}} to x_{i_k} for the rest of
    the model): (L - 2) P = x_2 (L - 2) + sum_{k=1..K} (x_{i_k} - x_{i_{k-1}}) (L - i_k).

    Choices:
    - Eq. 4-5 read as "x_i exceeds the level M_i of the previously selected layers", the baseline
      i_0 = 2 included, so x_{i_1} > x_2 (Eq. 6-8 take x_2 as the level before the first pruning
      layer). Neither restriction changes the optimal P: removing a layer whose x does not exceed
      its predecessor's extends the higher level over its span and never lowers P; the tie-break
      below therefore returns the same set as an unconstrained search over all subsets.
    - K = 0 is allowed: [] means no layer >= 3 beats x_2 (P = x_2).
    - Ties in P (compared exactly): fewer layers first, then the lexicographically smallest list.
    Layer L spans L - L = 0 layers in Eq. 7 and is therefore never chosen.
    """
    if isinstance(profile, (str, bytes)):
        raise ValueError(f"profile: expected a sequence of finite real numbers, got {profile!r}")
    try:
        x = [Fraction(float(v)) for v in profile]  # exact, so ties are exact
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"profile: expected a sequence of finite real numbers ({err})") from None
    num_layers = len(x)
    if num_layers < 3:
        raise ValueError(f"profile: expected at least 3 layers, got {num_layers}")
    m = as_int(m, "m", 0)

    def level(i):
        return x[i - 1]

    # chains[i] = (gain, layers): best chain with c layers ending at layer i, where gain is the
    # Eq. 8 sum above; c = 0 is the baseline "chain" ending at i_0 = 2.
    chains = {2: (Fraction(0), ())}
    best = (Fraction(0), ())
    for _ in range(m):
        longer = {}
        for i in range(3, num_layers + 1):
            options = [(gain + (level(i) - level(p)) * (num_layers - i), layers)
                       for p, (gain, layers) in chains.items() if p < i and level(p) < level(i)]
            if options:
                # Eq. 9 is this comparison between two candidate last updates.
                gain, layers = min(options, key=lambda o: (-o[0], o[1]))
                longer[i] = (gain, layers + (i,))
        if not longer:
            break
        best = min([best, *longer.values()], key=lambda o: (-o[0], len(o[1]), o[1]))
        chains = longer
    return list(best[1])
