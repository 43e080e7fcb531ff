"""`apply`: how a transformers VLM is patched (the package docstring tells the design), and the state
a patched model carries, which the decoder loop (`_decoder.py`) and the profiler (`_profile.py`) read.
`swiftvlm_kernels.hf` re-exports the public names."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..pruning.plan import check_pruning
from . import _decoder
from .compat import check_release

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
class Profile:
    """What the decoder loop does for the profiler (`layer_profile`) in one call."""
    keep_ratio: float
    scores_out: Optional[list] = None      # a recording run: receives each layer's fp32 [B, M] scores
    stage_scores: Optional[Tensor] = None  # a replay run: the layer-2 stage's selection scores


@dataclass
class State:
    """What a patched model carries (`model._swiftvlm_state`, also on its language model): the
    pruning setting, the call's input_ids (set by the wrapped multimodal forward), the profiler's
    request and the last pruned prefill's record."""
    pruning: object
    backend: Optional[str]
    family: str
    image_token_id: int
    input_ids: Optional[Tensor] = None
    last: Optional[PrefillRecord] = None
    profile: Optional[Profile] = None

    def record(self, plan, kept: list, token_index: Tensor, layer_lengths: list) -> None:
        """Keep what a pruned prefill did (`last_prefill`)."""
        self.last = PrefillRecord(plan, kept, token_index, layer_lengths)


def model_family(model) -> Optional[str]:
    """The family of a supported model ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"), else None."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
    return None


def apply(model: nn.Module, pruning, *, backend: Optional[str] = None) -> nn.Module:
    """Patch a loaded transformers VLM in place so that its prefill prunes visual tokens.

    Parameters
    ----------
    model: a `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
        `Qwen2VLForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration` (or a subclass).
    pruning: a pruning method (`SwiftVLM(...)`, `FastV(...)`, `PDrop(...)`, `ALVTS(...)`; its plan is
        made per call for the call's visual-token count and the model's depth), a `PruningPlan` /
        `RaggedPlan` for one exact input shape, or None to restore the original model.
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
    family = model_family(model)
    if family is None:
        raise ValueError(f"model: expected one of {', '.join(SUPPORTED)}, got {type(model).__name__}")
    import transformers

    check_release(transformers.__version__)
    outer = model.model
    text = outer.language_model
    if pruning is None:
        if getattr(model, "_swiftvlm_state", None) is not None:
            for module in (model, outer, text):
                module.__class__ = base_class(module)
                module.__dict__.pop("_swiftvlm_state", None)
        return model
    check_pruning(pruning)
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
    state = State(pruning, backend, family, int(image_token_id))
    for module, role in ((model, "model"), (outer, "outer"), (text, "text")):
        module.__class__ = _patched_class(type(module), role)
        module._swiftvlm_state = state
    return model


# ---- the patch: each of the three modules' class is swapped for a subclass of it (made once per class)
# whose methods read the module's own state. Nothing is bound to one instance, so copy.deepcopy gives a
# model that runs its own weights, and pickling (torch.save) stores the unpatched classes and the
# pruning setting, and re-applies it on loading.

def base_class(module) -> type:
    """The class a patched module had before `apply` (its own class when it is not patched)."""
    return getattr(type(module), "_swiftvlm_base", type(module))


def _model_forward(self, *args, **kwargs):
    if kwargs.get("labels") is not None and self._swiftvlm_state.pruning is not None:
        raise ValueError("labels: a patched model computes no loss (a pruned prefill's logits have one row per token "
                         "that reaches the last layer, not one per label); restore it with hf.apply(model, None) "
                         "to train or to score labels")
    return base_class(self).forward(self, *args, **kwargs)


def _model_generate(self, *args, **kwargs):
    config = kwargs.get("generation_config") or self.generation_config
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        raise ValueError("use_cache: generating without a KV cache re-runs the prefill at every step, which a "
                         "patched model would prune again, scored by each newest token; generate with the cache "
                         "(use_cache=True, the default), or restore the model with hf.apply(model, None)")
    return base_class(self).generate(self, *args, **kwargs)


def _outer_forward(self, *args, **kwargs):
    """The multimodal model's forward, letting the language model see the call's input_ids (it only
    receives the merged embeddings)."""
    state = self._swiftvlm_state
    state.input_ids = kwargs.get("input_ids", args[0] if args else None)
    try:
        return base_class(self).forward(self, *args, **kwargs)
    finally:
        state.input_ids = None


def _unpatched(cls, state):
    module = cls.__new__(cls)
    module.__setstate__(state)
    return module


def _repatched(cls, state, pruning, backend):
    return apply(_unpatched(cls, state), pruning, backend=backend)


def _reduce(self, protocol):
    """Pickle / deepcopy as the unpatched class; the top model re-applies its pruning when rebuilt."""
    state = {k: v for k, v in self.__getstate__().items() if k != "_swiftvlm_state"}
    if "_swiftvlm_base" in type(self).__dict__ and type(self).__dict__.get("_swiftvlm_role") == "model":
        own = self._swiftvlm_state
        return _repatched, (base_class(self), state, own.pruning, own.backend)
    return _unpatched, (base_class(self), state)


_ROLES = {
    "model": {"forward": _model_forward, "generate": _model_generate},
    "outer": {"forward": _outer_forward},
    "text": {"forward": _decoder.forward},
}
_PATCHED: dict = {}


def _as_method_of(base: type, name: str, function):
    """`function` as the method `name` of a subclass of `base`, showing the base method's signature
    (transformers' generate validates its keyword arguments against forward's)."""
    @functools.wraps(getattr(base, name))
    def method(self, *args, **kwargs):
        return function(self, *args, **kwargs)
    return method


def _patched_class(base: type, role: str) -> type:
    key = (base, role)
    if key not in _PATCHED:
        # the same name and module as the base class: transformers and users read them
        methods = {name: _as_method_of(base, name, function) for name, function in _ROLES[role].items()}
        body = dict(methods, _swiftvlm_base=base, _swiftvlm_role=role, __reduce_ex__=_reduce,
                    __module__=base.__module__, __qualname__=base.__qualname__)
        _PATCHED[key] = type(base.__name__, (base,), body)
    return _PATCHED[key]


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
    check_pruning(pruning)
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
