"""The decoder loop with pruning stages, written once: `run_layers` runs a plan's stages around a
client's per-layer callable. The minimal LLaVA forward (`models/llava.py`) and the transformers path
(`hf/_decoder.py`) are its two clients; what differs between them (their layers' call, the attention
mask, caches, what they record) stays in their hooks.

    for i in 1 .. num_layers:
        if a stage s acts before layer i (SwiftVLM s >= 2, ALVTS):
            seq = engine.restore(seq)                   # every visual token back (Eq. 12-13)
            inputs = stage_inputs(i, seq)               # layer i's last query and keys on that sequence
            seq = engine.select(seq, s, *inputs)        # (ALVTS: its selector's queries and keys)
            restaged(seq, s)                            # layer i runs on the kept set
        inputs = run_layer(seq, Step(i, ...))           # sets seq.h; the stage after i's inputs
        if stage s selects for layer i only (ALVTS):
            seq = engine.restore(seq)                   # the skipped tokens rejoin, unchanged
            restaged(seq, s)
        if a stage s acts after layer i (the first, drop-only stages):
            seq = engine.select(seq, s, *inputs)        # effective from layer i + 1
            restaged(seq, s)

Also here, for decoder layers laid out like transformers' LLaMA (`input_layernorm`,
`self_attn.q_proj` / `k_proj`, `self_attn.head_dim`): the rotate-half RoPE (`rope`) and a stage's
scoring inputs (`stage_inputs`, `last_query`; ALVTS: `selector_stage_inputs`). Nothing in the loop
reads device values on the host.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .engine import PruningEngine, Sequence
from .selector import Selector, selector_inputs


def rope(x: Tensor, cos: Tensor, sin: Tensor, *, folded: bool = False) -> Tensor:
    """x [B, n, heads, D] rotated by the tables cos, sin [B, n, D]: x cos + rotate_half(x) sin, the
    rotate-half RoPE of transformers' LLaMA. folded: `sin` carries rotate_half's sign (-sin on the
    first half), so that rotate_half(x) * sin = roll(x, D / 2) * sin (one op fewer)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    turned = x.roll(half, -1) if folded else torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + turned * sin


def _heads(proj, x: Tensor, head_dim: int) -> Tensor:
    """proj(x) [B, n, heads * D] as [B, n, heads, D]."""
    return proj(x).unflatten(-1, (-1, head_dim))


def last_query(layer, x_last: Tensor, cos: Tensor, sin: Tensor, *, folded: bool = False) -> Tensor:
    """The layer's query of the last row, from that row's normed input x_last [B, 1, d] and the
    sequence's tables cos, sin [B, n, D]: [B, H, D] after RoPE."""
    attn = layer.self_attn
    return rope(_heads(attn.q_proj, x_last, attn.head_dim), cos[:, -1:], sin[:, -1:], folded=folded)[:, 0]


def stage_inputs(layer, h: Tensor, cos: Tensor, sin: Tensor, *, folded: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """What a stage that acts before `layer` scores with, on the (restored) sequence h [B, n, d]: the
    normed input x, the keys of every row k [B, n, Hkv, D] and the last token's query [B, H, D], after
    RoPE (Eq. 19's extra work: the rest tokens' keys and one query)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    k = rope(_heads(attn.k_proj, x, attn.head_dim), cos, sin, folded=folded)
    return x, k, last_query(layer, x[:, -1:], cos, sin, folded=folded)


class StageInputs(NamedTuple):
    """What a stage scores with: the last token's query and every row's keys of one layer (an ALVTS
    stage: the selector's queries and keys of every row, [B, 1, n, R] each)."""
    q_last: Tensor      # [B, H, D], after RoPE
    keys: Tensor        # [B, Hkv, n, D], after RoPE (any strides)
    extra: Any = None   # the client's own, handed back to run_layer (see Step.prepared)


def selector_stage_inputs(layer, selector: Selector, layer_no: int, h: Tensor) -> StageInputs:
    """What an ALVTS stage before `layer` (1-indexed layer_no) scores with, on the full sequence h
    [B, n, d]: the selector's queries and keys of the layer's normed input x, [B, 1, n, R] each (no
    RoPE); extra: (x, None), which the layer may reuse at its kept rows."""
    x = layer.input_layernorm(h)
    q, k = selector_inputs(selector, layer_no, x)
    return StageInputs(q, k, (x, None))


class Step(NamedTuple):
    """What `run_layers` hands the client's `run_layer` for 1-indexed layer i."""
    layer: int
    before: Optional[int]                # the stage that acted just before layer i (SwiftVLM s >= 2, ALVTS), or None
    prepared: Optional[StageInputs]      # what stage_inputs(i, ...) returned for it, or None
    after: Optional[int]                 # the stage that acts right after layer i, or None


def run_layers(seq: Sequence, plan, engine: Optional[PruningEngine], num_layers: int,
               run_layer: Callable[[Sequence, Step], Optional[StageInputs]], *,
               stage_inputs: Callable[[int, Sequence], StageInputs],
               restaged: Optional[Callable[[Sequence, int], None]] = None,
               scores: Optional[Callable[[int], Optional[Tensor]]] = None) -> Sequence:
    """Run layers 1..num_layers over `seq` with the stages of `plan` (None: no pruning); returns the
    sequence after the last layer.

    run_layer(seq, step): run layer step.layer on seq (set seq.h); when step.after is a stage, return
        its StageInputs (the layer's own last query and keys; PDrop's official variant: the next
        layer's), else anything (ignored).
    stage_inputs(i, seq): layer i's StageInputs on seq, for a stage that acts before layer i.
    restaged(seq, s): called after stage s shortened the sequence (rebuild masks, positions, ...),
        and after an ALVTS stage's skipped tokens rejoined (the sequence before the stage again).
    scores(s): fp32 [B, M] scores that replace stage s's own (analysis), or None.
    """
    def stage(seq: Sequence, s: int, inputs: Optional[StageInputs]) -> Sequence:
        assert engine is not None and inputs is not None
        seq = engine.select(seq, s, inputs.q_last, inputs.keys, scores(s) if scores else None)
        if restaged is not None:
            restaged(seq, s)
        return seq

    for i in range(1, num_layers + 1):
        before = plan.stage_before(i) if plan is not None else None
        prepared = None
        if before is not None:
            assert engine is not None
            seq = engine.restore(seq)
            prepared = stage_inputs(i, seq)
            seq = stage(seq, before, prepared)
        after = plan.stage_after(i) if plan is not None else None
        inputs = run_layer(seq, Step(i, before, prepared, after))
        if before is not None and plan.layer_only(before):  # ALVTS: the skipped tokens rejoin
            assert engine is not None
            seq = engine.restore(seq)
            if restaged is not None:
                restaged(seq, before)
        if after is not None:
            seq = stage(seq, after, inputs)
    return seq
