"""The layer-wise profile of Sec. 3.2 (Eq. 3): how well each layer's T-V attention picks the visual
tokens that matter. Its output x_1..x_L is the input of `pruning.select_pruning_layers`.

For every layer i, the paper keeps the text and image inputs, keeps all tokens in layers 1-2 and,
from layer 3 on, only the top V% visual tokens that layer i selects in the vanilla forward; x_i is
the task metric of that run. Here a run is a LlavaForward forward (or greedy generation) with one
drop-only stage at layer 2 whose selection is layer i's vanilla T-V scores (`stage_scores`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

from .llava import LlavaForward
from .pruning import PruningPlan, Stage


def layer_profile(model: LlavaForward, samples: Iterable[Mapping], metric: Callable[[Mapping, object], float], *,
                  keep_ratio: float = 0.25, max_new_tokens: Optional[int] = None) -> list[float]:
    """[x_1, ..., x_L]: the mean of metric(sample, output) over `samples` when layer i's top
    keep_ratio visual tokens are the only ones kept from layer 3 on (Eq. 3).

    samples: mappings with input_ids, pixel_values and optionally attention_mask (any batch size).
    output: the run's LlavaOutput, or its generated ids [B, max_new_tokens] when max_new_tokens is given.
    Layer i's selection uses its own query/keys on its vanilla input (the tokens' T-V scores).
    """
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
