"""The language model's forward while a transformers VLM is patched by `swiftvlm_kernels.hf.apply`.

One function, `forward`, bound to the text model instance (LlamaModel / Qwen2-VL-like text models
of LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL). It picks one of three paths per call:

1. Pruned prefill (`_prefill`): an empty cache and image tokens in the call's input_ids. The loop
   over HF's decoder layers of docs/semantics.md "The SwiftVLM prefill": a stage that acts after layer x takes
   layer x's keys as the layer writes them (a tap on the cache's `update`, so no key is computed
   twice) and the last token's query (one row: input norm, q_proj, RoPE); a SwiftVLM stage s >= 2
   restores the bypassed tokens and computes layer y's keys and last query on them before the layer
   runs on the kept set. An ALVTS stage computes its selector's queries and keys on layer l's normed
   input (all rows) before the layer, which runs on the kept set; the skipped tokens rejoin after it.
   After every stage the shorter sequence's mask is the corner of HF's mask of the input sequence
   (`_corner`: rows stay in position order, so index-causal is position-causal, and left padding
   is never pruned; no mask is built, nothing is read on the host); a ragged batch's, whose block
   padding rows move, is rebuilt with HF's `create_causal_mask` from its 2-D key mask. The input
   sequence, whole again after an ALVTS layer, gets the input's own mask back. Per-token RoPE tables
   (cos and sin stacked, [B, n, 2, D]: one gather per move) move with the tokens.
   PDrop(official=True) instead scores with layer x + 1's query and keys on layer x's output and
   then renumbers the positions (each row's original position minus the tokens dropped before it;
   the RoPE tables are recomputed), recording per layer the shift decoding applies. The profiler
   (`_profile.py`) uses the same loop: a recording run taps every layer's scores, a replay run
   gives a layer-2 stage its selection scores.
2. Decoding from a pruned cache (`_decode`): each layer's mask from its own cache length and prefill
   key mask (see the package docstring).
3. Anything else: the text model's original forward.

The layer loop with its stages is `pruning.loop.run_layers`, which the minimal LLaVA forward runs
too; the stages' scoring inputs are `pruning.loop.stage_inputs` / `last_query`, the visual-span
checks `pruning.layout`. What is this path's own: the key tap, HF's masks, PDrop official's
positions, the profiler's recording and replay, the per-layer cache tags.

Host reads happen only in `_host_ids` / `_layout` (one copy of input_ids, the input checks on them and
on attention_mask, as in the minimal LLaVA forward); the layer loop, the stages and decoding read nothing back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from .compat import cache_parameter, function_cache_parameter, output_cache_field, pop_cache
from ..pruning import PruningEngine, PruningPlan, RaggedPlan, Sequence, Stage, loop
from ..pruning.layout import RaggedLayout, SpanErrors, check_spans, ragged_layout
from ..pruning.loop import StageInputs, Step, run_layers
from ..pruning.plan import plan_for_counts
from ..pruning.selector import selector_for

_DROPPED_KWARGS = ("output_attentions", "output_hidden_states", "return_dict")


@dataclass
class _CacheInfo:
    """Tagged on a DynamicCache after a pruned prefill: what each layer's prefill rows are."""
    key_masks: list      # per layer: bool [B, n_l] valid keys of its prefill rows, or None (all valid)
    lengths: list        # per layer: n_l
    prompt_len: int      # the prompt's length in the caller's 2-D attention mask
    shifts: Optional[list] = None  # PDrop official: per layer, int64 [B] (or None) to subtract from positions


class _KeyTap:
    """Stands in for the KV cache in one layer call: records the keys the layer writes (after
    RoPE, [B, Hkv, n, D]) and passes everything on to the real cache (or returns them, no cache)."""

    def __init__(self, cache):
        self.cache, self.keys = cache, None

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = key_states
        if self.cache is None:
            return key_states, value_states
        return self.cache.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def _stage_inputs(layer, seq: Sequence) -> StageInputs:
    """Layer's last query [B, H, D] and keys of every row [B, Hkv, n, D] on seq (HF's rotary tables)."""
    _, k, q_last = loop.stage_inputs(layer, seq.h, *_tables(seq))
    return StageInputs(q_last, k.transpose(1, 2))


def _tables(seq: Sequence) -> tuple[Tensor, Tensor]:
    """The rows' RoPE tables cos, sin [B, n, D]: views of the one carried tensor [B, n, 2, D], so that
    a stage moves them with one gather."""
    cos, sin = seq.carry["rope"].unbind(2)
    return cos, sin


def _real_rows(seq: Sequence) -> Tensor:
    """int64 [B, n]: 1 for the rows that hold a token (valid keys), 0 for padding rows."""
    if seq.key_mask is None:
        return torch.ones(seq.h.shape[:2], dtype=torch.long, device=seq.h.device)
    return seq.key_mask.long()


def _positions(text, family: str, h: Tensor, position_ids: Optional[Tensor], past: int):
    """(rotary positions, positions the layers receive), exactly as the family's own text forward
    forms them."""
    B, n = h.shape[:2]
    if not family.startswith("qwen"):
        if position_ids is None:
            position_ids = (torch.arange(n, device=h.device) + past)[None]
        return position_ids, position_ids
    if position_ids is None:
        position_ids = (torch.arange(n, device=h.device) + past).view(1, 1, -1).expand(3, B, -1)
    elif position_ids.ndim == 2:
        position_ids = position_ids[None].expand(3, position_ids.shape[0], -1)
    if position_ids.ndim == 3 and position_ids.shape[0] == 4:
        return position_ids[1:], position_ids[0]
    return position_ids, None


def _causal_mask(text, h: Tensor, attention_mask, cache=None, position_ids=None, layer_idx=None):
    from transformers.masking_utils import create_causal_mask

    kwargs = {} if layer_idx is None else {"layer_idx": layer_idx}
    kwargs[function_cache_parameter(create_causal_mask)] = cache
    return create_causal_mask(config=text.config, inputs_embeds=h, attention_mask=attention_mask,
                              position_ids=position_ids, **kwargs)


def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
            use_cache=None, **kwargs):
    """The patched text model's forward (see the module docstring); HF's signature and output."""
    state = self._swiftvlm_state
    cache = pop_cache(kwargs, past_key_values)  # transformers names it `cache` or `past_key_values`
    info = getattr(cache, "_swiftvlm", None)
    if info is not None:
        return _decode(self, state, info, input_ids, attention_mask, position_ids, cache, inputs_embeds,
                       use_cache, kwargs)
    ids = state.input_ids
    past = cache.get_seq_length() if cache is not None else 0
    if ids is None or inputs_embeds is None or past != 0 or tuple(ids.shape) != tuple(inputs_embeds.shape[:2]):
        ids = None
    else:
        ids = _host_ids(ids, state.image_token_id)
    if ids is None:
        base = type(self)._swiftvlm_base  # the class before the patch (hf/patch.py)
        kwargs[cache_parameter(base)] = cache
        return base.forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    return _prefill(self, state, ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs)


def _host_ids(ids: Tensor, image_token_id: int) -> Optional[Tensor]:
    """The prefill's input_ids on the host (one copy, which `_layout` checks), or None when they hold
    no image token (the call is not a pruned prefill)."""
    ids = ids.detach().cpu()
    return ids if bool((ids == image_token_id).any()) else None


def _output(h, cache):
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=h, **{output_cache_field(BaseModelOutputWithPast): cache})


# This path's wording of the visual-span errors (pruning.layout.check_spans checks them).
_SPAN_ERRORS = SpanErrors(
    left_padding="attention_mask: pruning supports left padding only (each row 0...0 1...1, the last token valid); "
                 "use tokenizer padding_side='left'",
    not_contiguous="input_ids: sample {b}: its {n} image tokens are not contiguous; pruning takes one span of visual "
                   "tokens per sample (images side by side form one pool)",
    ends_with_image="input_ids: sample {b} ends with its image; pruning scores visual tokens with the last text "
                    "token's query, so a text token must follow the image")


def _layout(ids: Tensor, attention_mask: Optional[Tensor], image_token_id: int,
            device) -> tuple[list, Tensor, Optional[RaggedLayout], bool]:
    """(per-sample visual counts, vis_start int32 [B], a ragged batch's padded layout or None, whether
    attention_mask marks any padding): the
    visual spans of a prefill's input_ids (on the host: `_host_ids`), checked there."""
    B, L = ids.shape
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2
                                       or tuple(attention_mask.shape) != (B, L)):
        raise ValueError(f"attention_mask: pruning takes a 2-D attention mask of shape [{B}, {L}] (1 = token, "
                         f"0 = left padding) or None, got "
                         f"{type(attention_mask).__name__ if not isinstance(attention_mask, Tensor) else list(attention_mask.shape)}")
    valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    counts, starts = check_spans(ids, valid, image_token_id, _SPAN_ERRORS)
    if len(set(counts)) == 1:
        return counts, torch.tensor(starts, dtype=torch.int32, device=device), None, not bool(valid.all())
    ragged = ragged_layout(valid, counts, starts, device)
    return counts, ragged.vis_start, ragged, True


def _corner(full_mask, seq: Sequence):
    """HF's mask of a left-padded (not ragged) sequence that a stage shortened to n rows: the full
    sequence's mask cut to its first n rows and keys (None stays None: causal attention). The kept rows
    stay in position order and the padding rows, the first ones, are never pruned, so kept row i sees
    kept key j exactly when input row src_i sees input key src_j (docs/semantics.md); no mask is built
    and nothing is read on the host."""
    if full_mask is None or seq.src is None:
        return full_mask
    n = seq.h.shape[1]
    return full_mask[..., :n] if full_mask.dim() == 2 else full_mask[..., :n, :n]


def _plan(pruning, counts: list, num_layers: int):
    """The plan for these per-sample visual counts (a RaggedPlan when they differ)."""
    return plan_for_counts(pruning, counts, num_layers)


def _profile_plan(counts: list, num_layers: int, keep_ratio: float):
    """The profile's plan: one drop-only stage at layer 2 keeping max(1, round(keep_ratio * n)) of
    each sample's n visual tokens (from layer 3 on)."""
    plans = [PruningPlan("fastv", n, num_layers, (Stage(2, max(1, round(keep_ratio * n)), 0),), bypass=False)
             for n in counts]
    return plans[0] if len(set(counts)) == 1 else RaggedPlan(tuple(plans))


def _prefill(self, state, ids, attention_mask, position_ids, cache, h, use_cache, kwargs):
    for key in _DROPPED_KWARGS:
        kwargs.pop(key, None)
    if use_cache is None:
        use_cache = self.config.use_cache
    if isinstance(attention_mask, dict):
        raise ValueError("attention_mask: pruning takes a 2-D attention mask, got prepared per-layer-type masks "
                         "(a compileable cache?); use the default DynamicCache")
    from transformers.cache_utils import DynamicCache

    if use_cache and cache is None:
        cache = DynamicCache(config=self.config)
    if cache is not None and type(cache) is not DynamicCache:
        raise ValueError(f"{cache_parameter(type(self)._swiftvlm_base)}: pruning keeps per-layer pruned caches in a DynamicCache, got "
                         f"{type(cache).__name__}")
    layers = self.layers[: self.config.num_hidden_layers]
    counts, vis_start, ragged, padded = _layout(ids, attention_mask, state.image_token_id, h.device)
    prof = state.profile
    if prof is None:
        plan = _plan(state.pruning, counts, len(layers))
    else:  # the layer profile (Sec. 3.2): a recording run (no plan) or one drop-only stage at layer 2
        plan = None if prof.stage_scores is None else _profile_plan(counts, len(layers), prof.keep_ratio)
    record = prof is not None and prof.scores_out is not None
    B, L = ids.shape
    rope_pos, layer_pos = _positions(self, state.family, h, position_ids, 0)
    rope = torch.stack([t.expand(B, L, -1) for t in self.rotary_emb(h, rope_pos)], 2)  # [B, L, 2, D]: cos, sin
    # no padding: no key mask (the stages and decoding then need none)
    key_mask = None if attention_mask is None or not padded else attention_mask.to(device=h.device, dtype=torch.bool)
    index = torch.arange(L, device=h.device).expand(B, L)
    if ragged is None:
        seq = Sequence.begin(h, vis_start, max(counts), key_mask, {"rope": rope, "index": index},
                             left_padded=True)
        mask = _causal_mask(self, h, attention_mask, cache, layer_pos)  # HF's own mask for the full sequence
    else:  # the padded ragged layout: block padding rows are zero and invalid keys
        src, W = ragged.src, ragged.src.shape[1]
        ok = src >= 0
        rows = src.clamp_min(0).view(-1)

        def take(x):
            return torch.where(ok.view(B, W, *[1] * (x.dim() - 2)), x.reshape(B * L, *x.shape[2:])[rows].view(B, W, *x.shape[2:]), 0)

        def take_positions(p):  # [1 or B, L] integer positions in the padded layout (padding rows 0)
            return take(p.expand(B, L)[..., None])[..., 0]

        flat_index = torch.where(ok, src % L, -1)
        h, rope = take(h), take(rope)
        key_mask = ok if key_mask is None else ok & key_mask.reshape(-1)[rows].view(B, W)
        seq = Sequence.begin(h, vis_start, ragged.width, key_mask, {"rope": rope, "index": flat_index},
                             vis_counts=ragged.counts)
        mask = _causal_mask(self, h, key_mask)
    engine = PruningEngine(plan, layers[0].self_attn.scaling, state.backend) if plan is not None else None
    selector = selector_for(state.pruning if prof is None else None, plan, layers, self.config.hidden_size)
    full_mask = mask
    official = prof is None and bool(getattr(state.pruning, "official", False))
    if official:  # PDrop's official variant: positions renumbered after each drop (1-D RoPE only)
        real = _real_rows(seq)
        seq.carry["pos0"] = rope_pos.expand(B, L) if ragged is None else take_positions(rope_pos)
        seq.carry["rank0"] = real.cumsum(1) - real  # each real row's rank among real rows
    key_masks, lengths, shifts = [], [], []
    shift = None  # official: [B] visual tokens dropped before the last row so far

    def restaged(seq, s):  # a stage shortened the sequence: HF's mask for it (official: new positions first)
        nonlocal mask, shift
        if official:
            real = _real_rows(seq)
            dropped = seq.carry["rank0"] - (real.cumsum(1) - real)
            pos = seq.carry["pos0"] - dropped
            seq.carry["rope"] = torch.stack(self.rotary_emb(seq.h, pos), 2)
            shift = dropped[:, -1]
        mask = _corner(full_mask, seq) if ragged is None else \
            full_mask if seq.src is None else _causal_mask(self, seq.h, seq.key_mask)

    def run_layer(seq, step: Step):
        layer = layers[step.layer - 1]
        cos, sin = _tables(seq)
        tapped = (step.after is not None and not official) or record
        q_last = loop.last_query(layer, layer.input_layernorm(seq.h[:, -1:]), cos, sin) if tapped else None
        tap = _KeyTap(cache if use_cache else None) if tapped else (cache if use_cache else None)
        seq.h = layer(seq.h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None,
                      use_cache=use_cache, **{cache_parameter(layer): tap}, **kwargs)
        key_masks.append(seq.key_mask)
        lengths.append(seq.h.shape[1])
        shifts.append(shift)
        if record:  # this layer's T-V scores of the visual tokens (its own query and keys, Eq. 1-2)
            counts, width = (seq.vis_len, None) if seq.vis_counts is None else (seq.vis_counts, seq.vis_len)
            prof.scores_out.append(ops.tv_score(q_last, tap.keys, seq.vis_start, counts, layer.self_attn.scaling,
                                                seq.key_mask, max_vis_len=width, backend=state.backend))
        if step.after is None:
            return None
        if official:  # layer i + 1's query and keys on layer i's output
            return _stage_inputs(layers[step.layer], seq)
        return StageInputs(q_last, tap.keys)  # this layer's own query and keys

    def inputs_before(i, seq):  # ALVTS: layer i's selector on the full sequence; SwiftVLM: its last query, keys
        if selector is not None:
            return loop.selector_stage_inputs(layers[i - 1], selector, i, seq.h)
        return _stage_inputs(layers[i - 1], seq)

    seq = run_layers(seq, plan, engine, len(layers), run_layer, stage_inputs=inputs_before, restaged=restaged,
                     scores=lambda s: None if prof is None else prof.stage_scores)
    out = self.norm(seq.h)
    index = seq.carry["index"] if ragged is None else torch.where(seq.key_mask, seq.carry["index"], -1)
    state.record(plan, seq.kept, index, lengths)
    if use_cache:
        cache._swiftvlm = _CacheInfo(key_masks, lengths, L, shifts if official else None)
    return _output(out, cache if use_cache else None)


def _decode_masks(self, info: _CacheInfo, cache, h: Tensor, attention_mask) -> list:
    """Each layer's attention mask for a call on a pruned cache (the layer's prefill rows, the tokens
    generated since, this call's q).

    Without padding in the prefill (every layer's prefill rows are valid keys): HF's own mask of layer 1,
    which holds every prompt row, made once per call as the unpatched model makes it; a layer whose
    prefill kept n_l of the L rows takes its last n_l + t + q key columns (a view: the columns cut are
    prompt keys that every query of the call sees). With padding or a ragged batch: one mask per
    distinct prefill key mask, from that key mask and the call's new columns."""
    B, q = h.shape[:2]
    lengths = info.lengths
    if all(km is None for km in info.key_masks):
        if attention_mask is not None and attention_mask.shape[1] != cache.layers[0].get_seq_length() + q:
            t = cache.layers[0].get_seq_length() - lengths[0] + q
            raise ValueError(f"attention_mask: expected {info.prompt_len + t} columns (the prompt's "
                             f"{info.prompt_len} and {t} new tokens), got {attention_mask.shape[1]}")
        full = _causal_mask(self, h, attention_mask, cache, None, layer_idx=0)
        return [None if full is None else full[..., lengths[0] - n:] for n in lengths]
    new_cols = None if attention_mask is None else attention_mask[:, info.prompt_len:].to(h.device, torch.bool)
    masks, out = {}, []
    for l, (km, n_l) in enumerate(zip(info.key_masks, lengths)):
        key = (id(km), n_l)
        if key not in masks:
            t = cache.layers[l].get_seq_length() - n_l + q  # new-token columns (earlier ones and this call's)
            new = new_cols if new_cols is not None else torch.ones(B, t, dtype=torch.bool, device=h.device)
            if new.shape[1] != t:
                raise ValueError(f"attention_mask: expected {info.prompt_len + t} columns (the prompt's "
                                 f"{info.prompt_len} and {t} new tokens), got {info.prompt_len + new.shape[1]}")
            old = km if km is not None else torch.ones(B, n_l, dtype=torch.bool, device=h.device)
            masks[key] = _causal_mask(self, h, torch.cat([old, new], 1), cache, None, layer_idx=l)
        out.append(masks[key])
    return out


def _decode(self, state, info: _CacheInfo, input_ids, attention_mask, position_ids, cache, h, use_cache, kwargs):
    for key in _DROPPED_KWARGS:
        kwargs.pop(key, None)
    if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() != 2):
        raise ValueError("attention_mask: after a pruned prefill, calls on its cache take a 2-D attention mask "
                         "(the prompt's columns, then one per new token) or None")
    if h is None:
        h = self.embed_tokens(input_ids)
    B, q = h.shape[:2]
    past = cache.get_seq_length()
    rope_pos, layer_pos = _positions(self, state.family, h, position_ids, past)
    tables = {None: self.rotary_emb(h, rope_pos)}  # per position shift (PDrop official), else one
    masks = _decode_masks(self, info, cache, h, attention_mask)
    for l, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
        shift = None if info.shifts is None else info.shifts[l]
        if id(shift) not in tables and shift is not None:
            tables[id(shift)] = self.rotary_emb(h, rope_pos - shift[:, None])
        h = layer(h, attention_mask=masks[l], position_embeddings=tables[None if shift is None else id(shift)],
                  position_ids=layer_pos, use_cache=True, **{cache_parameter(layer): cache}, **kwargs)
    return _output(self.norm(h), cache)
