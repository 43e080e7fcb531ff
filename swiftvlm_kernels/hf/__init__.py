"""SwiftVLM, FastV, PDrop and ALVTS on Hugging Face transformers models, in one call.

    model = LlavaForConditionalGeneration.from_pretrained(...)
    swiftvlm_kernels.hf.apply(model, SwiftVLM(layers=(3, 11, 15)))
    model.generate(**inputs, max_new_tokens=32)          # pruned prefill, decoding from pruned caches
    swiftvlm_kernels.hf.apply(model, None)                # the original model again

Design
------
`apply` patches three modules of a loaded `LlavaForConditionalGeneration`,
`LlavaNextForConditionalGeneration`, `Qwen2VLForConditionalGeneration` or
`Qwen2_5_VLForConditionalGeneration` by giving each a subclass of its own class (made once per class,
with the same name; transformers' classes are untouched, so other models in the process are not
affected, and `apply(model, None)` gives the modules their classes back). The subclasses' methods read
the module's own `_swiftvlm_state`, nothing bound to one instance: `copy.deepcopy` gives a model that
runs its own weights, and `torch.save` / pickle stores the unpatched classes with the pruning setting,
which loading re-applies.

- the top model's `generate` refuses `use_cache=False` (each uncached step would prune again, scored
  by the newest token) and its `forward` refuses `labels` (a pruned prefill's logits have fewer rows);
- the multimodal model's `forward` (`model.model`) records the call's `input_ids` so that the language
  model can see them (it only receives the merged embeddings); visual spans come from the image
  token id (`config.image_token_id`);
- the language model's `forward` (`model.model.language_model`) is replaced by `_decoder.forward`,
  a decoder loop over HF's OWN decoder layers (their attention implementation: sdpa, eager,
  flash_attention_2) that drives the pruning engine (`swiftvlm_kernels.pruning.PruningEngine`) like
  the library's minimal LLaVA forward does: at a stage's layer it computes the last-token query and
  the keys with the layer's own input norm, projections and the model's rotary tables, and the
  engine shortens the sequence. Per-token tensors (the RoPE cos / sin tables, so LLaVA's 1-D and
  Qwen2-VL's M-RoPE positions alike) ride in `Sequence.carry`; a merged token takes its target's.
  Each layer writes its (pruned) keys / values into HF's DynamicCache as usual, so after the prefill
  the cache's layers hold different lengths. The cache is tagged with each layer's key mask (None
  when the prompt has no padding), and every later call on that cache (decoding, from `generate` or
  by hand) runs the same loop with one attention mask per layer. Without padding: HF's own mask of
  layer 1, which holds every prompt row, made once per call as the unpatched model makes it, and
  for each other layer a view of its last columns (the ones cut are prompt keys every new query
  sees), so a decoding step issues no op and no host read beyond the unpatched model's. With
  padding (or a ragged batch): one mask per distinct prefill key mask, built by HF's
  `create_causal_mask` sized to that layer's cache (`layer_idx`) from [the layer's prefill key
  mask, the new tokens' columns of the 2-D mask].
  Positions are HF's own: `generate` continues them from the original sequence (the attention
  mask's cumsum; Qwen2-VL adds its rope_deltas), never from a pruned length (docs/semantics.md property 5).

What a call prunes: a prefill (an empty cache) whose input_ids hold image tokens, with a 2-D (left
padding) or no attention mask. Anything else (text-only prompts, continuing from a filled cache that
was not pruned) runs HF's original forward. Each sample's image tokens must form one contiguous
span: several images side by side in one sample are pruned as ONE pool of visual tokens (LLaVA-NeXT
and Qwen2-VL put text between images, which is refused with a ValueError). Samples with different
visual-token counts (LLaVA-NeXT after padding removal, Qwen2-VL at dynamic resolution, or LLaVA
samples with different image counts) are laid out padded (each visual block padded to the widest,
the block padding an invalid key) and go through the ragged forms of the ops with a RaggedPlan.

The logits of a pruned `model(**inputs)` have one row per token that reaches the last layer (fewer
than input_ids' length); `last_prefill(model).token_index` maps them to input positions.
`output_hidden_states` / `output_attentions` are not collected on the patched path.
"""
from __future__ import annotations

from torch import nn

from ..pruning import ALVTS, FastV, PDrop, SwiftVLM
from ._profile import layer_profile
from .patch import SUPPORTED, PrefillRecord, apply, apply_on_load, is_applied, last_prefill, model_family

__all__ = ["apply", "apply_on_load", "is_applied", "last_prefill", "PrefillRecord", "default_layers", "default_method", "layer_profile",
           "SUPPORTED"]

# Default pruning layers per family (SwiftVLM Sec. 3.2; README "Use it with transformers")
_PAPER_LAYERS = (3, 11, 15)  # LLaVA-1.5-7B, 32 layers: the paper's selection


def default_layers(num_layers: int, method: str = "swiftvlm") -> tuple[int, ...]:
    """The library's default pruning layers for a decoder of `num_layers` layers.

    Parameters
    ----------
    num_layers: the language model's depth (>= 4).
    method: "swiftvlm" (three stages), "fastv" (one), "pdrop" (three) or "alvts" (every layer from 2 on).

    Returns
    -------
    1-indexed, strictly increasing layers. SwiftVLM: the paper's (3, 11, 15) at 32 layers
    (LLaVA-1.5-7B, LLaVA-NeXT-7B); at another depth L each layer scales as round(x * L / 32), kept
    >= 2, strictly increasing and below L (Qwen2-VL-7B, 28 layers: (3, 10, 13)). For a model of
    your own, run the profiler (`swiftvlm_kernels.hf.layer_profile`) and `select_pruning_layers`.
    FastV: layer 2 (its paper's K = 2). PDrop: L/4, L/2, 3L/4 (its paper's 8, 16, 24 at 32). ALVTS:
    every layer from 2 to L (layer 1 runs on all tokens).

    Raises
    ------
    ValueError: num_layers below 4 or an unknown method.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 4:
        raise ValueError(f"num_layers: expected an int >= 4, got {num_layers!r}")
    if method == "fastv":
        return (2,)
    if method == "pdrop":
        return tuple(sorted({max(1, min(num_layers - 1, round(num_layers * f))) for f in (0.25, 0.5, 0.75)}))
    if method == "alvts":
        return tuple(range(2, num_layers + 1))
    if method != "swiftvlm":
        raise ValueError(f"method: expected 'swiftvlm', 'fastv', 'pdrop' or 'alvts', got {method!r}")
    out = []
    for x in _PAPER_LAYERS:
        layer = max(2 if not out else out[-1] + 1, round(x * num_layers / 32))
        out.append(min(layer, num_layers - (len(_PAPER_LAYERS) - len(out)) + 1))
    return tuple(out)


def default_method(model: nn.Module, method: str = "swiftvlm", **kwargs):
    """A pruning method with the default layers for `model`'s depth (`default_layers`).

    Parameters
    ----------
    model: a supported transformers model.
    method: "swiftvlm", "fastv", "pdrop" or "alvts".
    kwargs: the method's other arguments (budget, budget_ratio, keep, ...).

    Returns
    -------
    SwiftVLM / FastV / PDrop / ALVTS.

    Raises
    ------
    ValueError: an unsupported model or method.
    """
    if model_family(model) is None:
        raise ValueError(f"model: expected one of {', '.join(SUPPORTED)}, got {type(model).__name__}")
    num_layers = len(model.model.language_model.layers)
    layers = default_layers(num_layers, method)
    if method == "fastv":
        return FastV(layer=layers[0], **kwargs)
    if method == "alvts":
        return ALVTS(layers=layers, **kwargs)
    return (SwiftVLM if method == "swiftvlm" else PDrop)(layers=layers, **kwargs)
