"""SwiftVLM, FastV and PDrop on Hugging Face transformers models, in one call.

    model = LlavaForConditionalGeneration.from_pretrained(...)
    swiftvlm_kernels.hf.apply(model, SwiftVLM(layers=(3, 11, 15)))
    model.generate(**inputs, max_new_tokens=32)          # pruned prefill, decoding from pruned caches
    swiftvlm_kernels.hf.apply(model, None)                # the original model again

Design
------
`apply` patches two module instances of a loaded `LlavaForConditionalGeneration`,
`LlavaNextForConditionalGeneration`, `Qwen2VLForConditionalGeneration` or
`Qwen2_5_VLForConditionalGeneration` (instance attributes only; the classes are untouched, so other
models in the process are not affected, and `apply(model, None)` deletes the attributes):

- the multimodal model's `forward` (`model.model`) is wrapped so that the language model can see the
  call's `input_ids` (it only receives the merged embeddings); visual spans come from the image
  token id (`config.image_token_id`);
- the language model's `forward` (`model.model.language_model`) is replaced by `_decoder.forward`,
  a decoder loop over HF's OWN decoder layers (their attention implementation: sdpa, eager,
  flash_attention_2) that drives the pruning engine (`swiftvlm_kernels.pruning.PruningEngine`) like
  the library's minimal LLaVA forward does: at a stage's layer it computes the last-token query and
  the keys with the layer's own input norm, projections and the model's rotary tables, and the
  engine shortens the sequence. Per-token tensors (the RoPE cos / sin tables, so LLaVA's 1-D and
  Qwen2-VL's M-RoPE positions alike) ride in `Sequence.carry`; a merged token takes its target's.
  Each layer writes its (pruned) keys / values into HF's DynamicCache as usual, so after the prefill
  the cache's layers hold different lengths. The cache is tagged with each layer's key mask, and
  every later call on that cache (decoding, from `generate` or by hand) runs the same loop with one
  attention mask per layer, built by HF's `create_causal_mask` sized to that layer's cache
  (`layer_idx`) from [the layer's prefill key mask, the new tokens' columns of the 2-D mask].
  Positions are HF's own: `generate` continues them from the original sequence (the attention
  mask's cumsum; Qwen2-VL adds its rope_deltas), never from a pruned length (SPEC property 5).

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

import contextlib
import types
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..pruning import FastV, PDrop, PruningPlan, RaggedPlan, SwiftVLM
from . import _decoder, _profile
from .compat import check_release
from ._profile import layer_profile

__all__ = ["apply", "apply_on_load", "is_applied", "last_prefill", "PrefillRecord", "default_layers", "default_method", "layer_profile",
           "SUPPORTED"]

# class name -> model family (the families share the decoder loop; they differ in how positions
# are formed, which `_decoder` reads from the family)
SUPPORTED = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass
class PrefillRecord:
    """What the last pruned prefill of a patched model did.

    plan          the PruningPlan (or RaggedPlan) it executed.
    kept          per stage, int64 [B, k_s]: the visual-token ids (0..N_v-1 within each sample's span)
                  kept there (a ragged batch: ascending, then -1).
    token_index   int64 [B, n]: each row of the returned hidden states / logits, its position in
                  input_ids (a ragged batch's block padding rows: -1).
    layer_lengths the rows each layer's KV cache holds after the prefill.
    """
    plan: object
    kept: list
    token_index: Tensor
    layer_lengths: list = field(default_factory=list)


@dataclass
class _State:
    pruning: object
    backend: Optional[str]
    family: str
    image_token_id: int
    input_ids: Optional[Tensor] = None
    last: Optional[PrefillRecord] = None
    profile: Optional["_profile.Profile"] = None


def _family(model) -> Optional[str]:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
    return None


def _check_pruning(pruning) -> None:
    if not isinstance(pruning, (PruningPlan, RaggedPlan)) and not callable(getattr(pruning, "plan", None)):
        raise ValueError(f"pruning: expected None, a PruningPlan, a RaggedPlan or a pruning method such as "
                         f"SwiftVLM(), FastV() or PDrop(), got {type(pruning).__name__} {pruning!r}")


def apply(model: nn.Module, pruning, *, backend: Optional[str] = None) -> nn.Module:
    """Patch a loaded transformers VLM in place so that its prefill prunes visual tokens.

    Parameters
    ----------
    model: a `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
        `Qwen2VLForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration` (or a subclass).
    pruning: a pruning method (`SwiftVLM(...)`, `FastV(...)`, `PDrop(...)`; its plan is made per call
        for the call's visual-token count and the model's depth), a `PruningPlan` / `RaggedPlan`
        for one exact input shape, or None to restore the original model.
    backend: the swiftvlm ops' backend for every op (None: each device's default).

    Returns
    -------
    The same model object (patched, or restored with pruning=None). Calling `apply` again replaces
    the pruning method.

    Raises
    ------
    ValueError: an unsupported model class or attention implementation, sliding-window attention,
        a pruning argument of the wrong type, or a float64 model with pruning.
    """
    family = _family(model)
    if family is None:
        raise ValueError(f"model: expected one of {', '.join(SUPPORTED)}, got {type(model).__name__}")
    import transformers

    check_release(transformers.__version__)
    outer = model.model
    text = outer.language_model
    if pruning is None:
        if getattr(model, "_swiftvlm_state", None) is not None:
            outer.__dict__.pop("forward", None)
            text.__dict__.pop("forward", None)
            text.__dict__.pop("_swiftvlm_state", None)
            del model._swiftvlm_state
        return model
    _check_pruning(pruning)
    if getattr(pruning, "official", False) and family.startswith("qwen"):
        raise ValueError("pruning: PDrop(official=True) renumbers 1-D positions after a drop; Qwen2-VL's M-RoPE "
                         "positions have no such renumbering (use official=False)")
    if backend is not None:
        from .._backend import requested
        requested(backend)
    config = text.config
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in ATTENTION:
        raise ValueError(f"model: attention implementation {attn!r} is not supported with pruning; expected one of "
                         f"{', '.join(ATTENTION)} (load with attn_implementation='sdpa')")
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])) or \
            getattr(config, "use_sliding_window", False):
        raise ValueError("model: sliding-window attention layers are not supported with pruning")
    if next(text.parameters()).dtype == torch.float64:
        raise ValueError("pruning: the swiftvlm ops take float32, float16 or bfloat16 hidden states; this model "
                         "is float64 (load it in float32 to prune)")
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_index", None)
    if image_token_id is None:
        raise ValueError("model: its config has no image_token_id / image_token_index")
    state = getattr(model, "_swiftvlm_state", None)
    if state is not None:
        state.pruning, state.backend = pruning, backend
        return model
    state = _State(pruning, backend, family, int(image_token_id))
    original = outer.forward  # the bound class method

    def forward(*args, **kwargs):
        state.input_ids = kwargs.get("input_ids", args[0] if args else None)
        try:
            return original(*args, **kwargs)
        finally:
            state.input_ids = None

    outer.forward = forward
    text._swiftvlm_state = state
    text.forward = types.MethodType(_decoder.forward, text)
    model._swiftvlm_state = state
    return model


def is_applied(model: nn.Module) -> bool:
    """Whether `model` is patched.

    Parameters
    ----------
    model: any module.

    Returns
    -------
    True when `apply` patched it with a pruning method (and `apply(model, None)` has not undone it).
    """
    return getattr(model, "_swiftvlm_state", None) is not None


def last_prefill(model: nn.Module) -> Optional[PrefillRecord]:
    """What the last pruned prefill of a patched model did.

    Parameters
    ----------
    model: a model patched by `apply`.

    Returns
    -------
    Its PrefillRecord (kept tokens per stage, each row's input position, each layer's cache length);
    None before the first pruned prefill or when the model is not patched.
    """
    state = getattr(model, "_swiftvlm_state", None)
    return None if state is None else state.last


# Default pruning layers per family (SwiftVLM Sec. 3.2; see NOTES / README "Use it with transformers")
_PAPER_LAYERS = (3, 11, 15)  # LLaVA-1.5-7B, 32 layers: the paper's selection


def default_layers(num_layers: int, method: str = "swiftvlm") -> tuple[int, ...]:
    """The library's default pruning layers for a decoder of `num_layers` layers.

    Parameters
    ----------
    num_layers: the language model's depth (>= 4).
    method: "swiftvlm" (three stages), "fastv" (one) or "pdrop" (three).

    Returns
    -------
    1-indexed, strictly increasing layers. SwiftVLM: the paper's (3, 11, 15) at 32 layers
    (LLaVA-1.5-7B, LLaVA-NeXT-7B); at another depth L each layer scales as round(x * L / 32), kept
    >= 2, strictly increasing and below L (Qwen2-VL-7B, 28 layers: (3, 10, 13)). For a model of
    your own, run the profiler (`swiftvlm_kernels.hf.layer_profile`) and `select_pruning_layers`.
    FastV: layer 2 (its paper's K = 2). PDrop: L/4, L/2, 3L/4 (its paper's 8, 16, 24 at 32).

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
    if method != "swiftvlm":
        raise ValueError(f"method: expected 'swiftvlm', 'fastv' or 'pdrop', got {method!r}")
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
    method: "swiftvlm", "fastv" or "pdrop".
    kwargs: the method's other arguments (budget, budget_ratio, keep, ...).

    Returns
    -------
    SwiftVLM / FastV / PDrop.

    Raises
    ------
    ValueError: an unsupported model or method.
    """
    if _family(model) is None:
        raise ValueError(f"model: expected one of {', '.join(SUPPORTED)}, got {type(model).__name__}")
    num_layers = len(model.model.language_model.layers)
    layers = default_layers(num_layers, method)
    if method == "fastv":
        return FastV(layer=layers[0], **kwargs)
    return (SwiftVLM if method == "swiftvlm" else PDrop)(layers=layers, **kwargs)


@contextlib.contextmanager
def apply_on_load(pruning, *, backend: Optional[str] = None) -> Iterator[None]:
    """Within the block, every supported transformers model loaded with `from_pretrained` (also
    through the Auto classes) comes back patched by `apply(model, pruning, backend=backend)`: a way
    to prune inside frameworks that load the model themselves (lmms-eval's llava_hf, qwen2_vl, ...).

    Parameters
    ----------
    pruning: a pruning method or plan, as for `apply` (not None).
    backend: the swiftvlm ops' backend (None: each device's default).

    Returns
    -------
    A context manager; on exit the classes' `from_pretrained` are restored (models already loaded
    stay patched; `apply(model, None)` restores one).

    Raises
    ------
    ValueError: a pruning argument of the wrong type (None included).
    """
    if pruning is None:
        raise ValueError("pruning: expected a pruning method or plan for apply_on_load, got None")
    _check_pruning(pruning)
    import transformers

    patched = []
    for name in SUPPORTED:
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        own = cls.__dict__.get("from_pretrained")
        func = cls.from_pretrained.__func__

        def load(klass, *args, __func=func, **kwargs):
            return apply(__func(klass, *args, **kwargs), pruning, backend=backend)

        cls.from_pretrained = classmethod(load)
        patched.append((cls, own))
    try:
        yield
    finally:
        for cls, own in patched:
            if own is None:
                del cls.from_pretrained
            else:
                cls.from_pretrained = own
