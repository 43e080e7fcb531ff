"""The layer-wise profile of Sec. 3.2 (Eq. 3) on a transformers model patched by `hf.apply`.

Same definition as `swiftvlm_kernels.pruning.layer_profile` for the minimal LLaVA forward: for every
layer i, x_i is the mean task metric when all tokens run through layers 1-2 and, from layer 3 on,
only the top keep_ratio of the visual tokens that layer i selects in the vanilla forward (its own
T-V scores, Eq. 1-2) are kept. One vanilla prefill per sample records every layer's scores (the
decoder loop taps each layer's keys and last-token query); then one run per layer replays a
drop-only stage at layer 2 whose selection is those scores (`PruningEngine.select(scores=...)`).
The model's own pruning setting is restored afterwards (or the model unpatched, if it was).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

from torch import nn

from ..pruning import FastV
from .patch import Profile, apply, model_family


def layer_profile(model: nn.Module, samples: Iterable[Mapping], metric: Callable[[Mapping, object], float], *,
                  keep_ratio: float = 0.25, max_new_tokens: Optional[int] = None,
                  backend: Optional[str] = None) -> list:
    """[x_1, ..., x_L] of Eq. 3 for a transformers VLM (LLaVA, LLaVA-NeXT, Qwen2-VL).

    Parameters
    ----------
    model: a supported transformers model (patched or not; its setting is restored afterwards).
    samples: mappings of model inputs (a processor's output: input_ids, attention_mask,
        pixel_values, ...; any batch size, left padding).
    metric: metric(sample, output) -> float, output being the model's output (ModelOutput with
        `.logits`) or, with max_new_tokens, generate's ids [B, L + new].
    keep_ratio: the fraction V of each sample's visual tokens kept from layer 3 on.
    max_new_tokens: greedy generation of this many tokens instead of one forward.
    backend: the swiftvlm ops' backend (None: each device's default).

    Returns
    -------
    list of float, one per decoder layer: the metric's mean over samples.

    Raises
    ------
    ValueError: an unsupported model, keep_ratio outside (0, 1], fewer than 3 layers, no samples.
    """
    if model_family(model) is None:
        raise ValueError(f"model: expected a supported transformers VLM, got {type(model).__name__}")
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio: expected a fraction in (0, 1], got {keep_ratio!r}")
    num_layers = len(model.model.language_model.layers)
    if num_layers < 3:
        raise ValueError(f"model: the profile keeps layers 1-2 whole, so it needs at least 3 layers, got {num_layers}")
    before = getattr(model, "_swiftvlm_state", None)
    saved = None if before is None else (before.pruning, before.backend)
    apply(model, FastV() if before is None else before.pruning, backend=backend)
    state = model._swiftvlm_state
    state.backend = backend
    totals, count = [0.0] * num_layers, 0
    try:
        for sample in samples:
            state.profile = Profile(keep_ratio, scores_out=[])
            model(**sample)
            scores, state.profile = state.profile.scores_out, None
            for i, layer_scores in enumerate(scores):
                state.profile = Profile(keep_ratio, stage_scores=layer_scores)
                if max_new_tokens is None:
                    output = model(**sample)
                else:
                    output = model.generate(**sample, max_new_tokens=max_new_tokens, do_sample=False)
                state.profile = None
                totals[i] += float(metric(sample, output))
            count += 1
    finally:
        state.profile = None
        if saved is None:
            apply(model, None)
        else:
            state.pruning, state.backend = saved
    if count == 0:
        raise ValueError("samples: expected at least one sample")
    return [total / count for total in totals]
