"""The pruning engine: runs a PruningPlan's stages inside any decoder loop.

The engine knows nothing of the model. A decoder loop hands it the current `Sequence` and, at a
pruning layer, the layer's last-token query and keys; it gets back the new sequence. The loop:

    seq = Sequence.begin(h, vis_start, key_mask, carry={"rope": rope_table})
    for i, layer in enumerate(layers, start=1):
        if (s := plan.stage_before(i)) is not None:      # SwiftVLM stage s >= 2
            seq = engine.restore(seq)                     # all N_v visual tokens back (Eq. 12-13)
            seq = engine.select(seq, s, q_last, k)        # layer i's query / keys on that sequence
        seq.h, q, k = layer(seq.h, ...)                   # per-token tensors: seq.carry[...]
        if (s := plan.stage_after(i)) is not None:       # first / drop-only stage
            seq = engine.select(seq, s, q[:, :, -1], k)   # effective from layer i + 1

`loop.run_layers` is this loop, written once for the library's models (hooks for the layer call
and a stage's scoring inputs).

A sequence. Text tokens are never pruned and each sample's visual tokens form one block of M rows
starting at row vis_start[b], so the batch stays rectangular and every sample keeps its block at
the same row. A ragged batch (samples with their own visual-token counts, `vis_counts`, and a
`RaggedPlan` of per-sample keep and merge counts) pads each sample's block to the widest: its own
visual rows first, then padding rows, which the key mask marks invalid (they are zero after a
stage); the ragged forms of the ops (int tensor counts with padded widths) run every stage. Rows stay in position order (the causal mask keeps its meaning); a merged token takes
its group target's row and position. The client's per-token tensors (RoPE tables, position ids,
anything [B, n, ...]) ride along in `carry`: each stage moves them with one index_select.

A stage (`select`): score_select (Eq. 1-2 and top-k); compact rebuilds the sequence in one pass and
sets the rest aside; for a merging stage, group_merge (Eq. 10-11) and one index_copy_ of the merged
tokens into their rows. `restore` (the next SwiftVLM stage) rebuilds the earlier sequence in one
pass, the bypassed tokens shifted by their merged token's drift (Eq. 12-13). Nothing reads device
values on the host, so the whole path can be captured in a CUDA graph.

An ALVTS stage (`plan.layer_only(s)`, docs/semantics.md "ALVTS") selects for one layer only: `select`
gets the selector's queries and keys of every row, scores the visual tokens with
attention_importance (S = t2v * v2v), keeps k_s with topk_select and compacts with Z = 0 (the layer's
rows: text + kept visual; the skipped rows set aside); after the layer, `restore` (Z = 0) puts the
skipped rows back unchanged, in position order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from .plan import PruningPlan, RaggedPlan


@dataclass
class _Bypass:
    """What a merging stage sets aside until the next stage restores it (Fig. 5)."""
    before: "Sequence"   # the sequence the stage compacted, without its hidden states
    inverse: Tensor      # [B, n] compact's: the new row carrying each earlier row, -1 for rest tokens
    rest_idx: Tensor     # [B, R] the rest tokens' block slots
    rest_h: Tensor       # [B, R, d] their states when set aside (h^x of Eq. 13)
    group: Tensor        # [B, R] their merged token
    merged_rows: Tensor  # [B, Z] where the merged tokens sit (flattened rows)
    merged_then: Tensor  # [B, Z, d] the merged tokens when made (h~^x_gm of Eq. 12)


@dataclass
class Sequence:
    """A batch's token sequence between pruning stages: what the decoder layers run on.

    h         [B, n, d] hidden states.
    vis_start [B] the row where each sample's visual block starts (the same row at every stage).
    vis_len   M, the visual block's rows (visual tokens kept and merged ones).
    key_mask  bool [B, n], True = a valid key; None = every key is valid (no padding).
    left_padded  True when key_mask is left padding (row i valid iff i >= the sample's padding) and
              no visual token is padding: a pruned sequence's key mask is then key_mask[:, :n], a
              view, since padding rows are text rows and text is never pruned.
    carry     the client's per-token tensors, [B, n, ...], moved with the tokens.
    src       int64 [B, n], each row's flattened row (b * n_prev + row) in the previous sequence;
              None at the start.
    kept      per stage so far, int64 [B, k_s]: the visual-token ids (0..N_v-1) kept there (a ragged
              batch: each sample's ids ascending, then -1).
    vis_counts  a ragged batch: int64 [B], each sample's own visual rows at the front of its block
              (the rest of the block is padding, invalid in key_mask); None: all M rows are visual.
    """
    h: Tensor
    vis_start: Tensor
    vis_len: int
    key_mask: Optional[Tensor] = None
    carry: dict = field(default_factory=dict)
    left_padded: bool = False
    src: Optional[Tensor] = None
    kept: list = field(default_factory=list)
    vis_counts: Optional[Tensor] = None
    _full: bool = True                    # the block holds every visual token, in id order
    _block_ids: Optional[Tensor] = None   # [B, M] visual ids of the block rows, when known
    _index: Optional[Tensor] = None       # [B, n] each row's input position, made on demand
    _parent: Optional["Sequence"] = None  # the previous sequence (hidden states dropped), for index
    _bypass: Optional[_Bypass] = None
    _place: Optional[Tensor] = None       # [B, n0 >= n] row - vis_start[b], made once, shared by the stages

    @classmethod
    def begin(cls, h: Tensor, vis_start: Tensor, vis_len: int, key_mask: Optional[Tensor] = None,
              carry: Optional[dict] = None, left_padded: bool = False,
              vis_counts: Optional[Tensor] = None) -> "Sequence":
        """The unpruned input sequence: h [B, L, d] with N_v = vis_len visual tokens per sample from
        row vis_start[b]; key_mask None when no key is padding. A ragged batch: vis_counts int [B]
        (each at most vis_len), its block padding rows False in key_mask (then not left_padded)."""
        if vis_counts is not None:
            if key_mask is None or left_padded:
                raise ValueError("key_mask: a ragged batch (vis_counts given) needs a key mask that marks its "
                                 "block padding rows invalid, and left_padded=False")
            vis_counts = vis_counts.to(device=h.device, dtype=torch.long)
        return cls(h, vis_start, vis_len, key_mask, dict(carry or {}), left_padded, vis_counts=vis_counts)

    def take(self, x: Tensor) -> Tensor:
        """x [B, n_prev, ...] of the previous sequence, moved to this sequence's rows."""
        return self.take_rows(x, self.src)

    @staticmethod
    def take_rows(x: Tensor, src: Tensor) -> Tensor:
        """x [B, n_prev, ...] at the flattened rows src [B, n]: [B, n, ...], one index_select."""
        B, n = src.shape
        return x.reshape(B * x.shape[1], *x.shape[2:]).index_select(0, src.view(-1)).view(B, n, *x.shape[2:])

    @property
    def index(self) -> Tensor:
        """int64 [B, n]: each row's position in the input sequence (a merged token: its target's)."""
        if self._index is None:
            if self._parent is None:
                B, n = self._size
                self._index = torch.arange(n, device=self.vis_start.device).expand(B, n)
            else:
                self._index = self._parent.index.reshape(-1)[self.src.view(-1)].view(self.src.shape)
        return self._index

    @property
    def block_ids(self) -> Tensor:
        """int64 [B, M]: the visual-token id of each row of the visual block."""
        if self._block_ids is not None:
            return self._block_ids
        if self._full:
            return torch.arange(self.vis_len, device=self.vis_start.device).expand(self._size[0], self.vis_len)
        rows = self.vis_start.to(torch.long)[:, None] + torch.arange(self.vis_len, device=self.vis_start.device)
        return self.index.gather(1, rows) - self.vis_start.to(torch.long)[:, None]

    def block_place(self, n: int) -> Tensor:
        """[B, n] in vis_start's dtype: each row's place relative to its sample's visual block (row -
        vis_start[b]); vis_start is the same at every stage, so one tensor serves them all (a view)."""
        if self._place is None or self._place.shape[1] < n:
            self._place = (torch.arange(n, device=self.vis_start.device, dtype=self.vis_start.dtype)[None, :]
                           - self.vis_start[:, None])
        return self._place[:, :n]

    def __post_init__(self):
        if self.h is not None:
            self._size = tuple(self.h.shape[:2])  # (B, n), kept when the hidden states are dropped

    def _metadata(self) -> "Sequence":
        """This sequence without its hidden states (what a bypass keeps of it)."""
        meta = replace(self, h=None, _bypass=None)
        meta._size = self._size
        return meta


class PruningEngine:
    """Executes one PruningPlan (or a ragged batch's RaggedPlan) on a batch: `select` at a stage's
    layer, `restore` before a later SwiftVLM stage. scale: the attention softmax scale
    (head_dim ** -0.5); backend: None for the device's default kernels, or a backend name for every
    op (tests, benchmarks)."""

    def __init__(self, plan, scale: float, backend: Optional[str] = None, *, process_group=None,
                 num_heads: Optional[int] = None):
        """process_group: a tensor-parallel group whose ranks each hand `select` their own query heads
        and the KV heads those read; every stage then scores with `distributed.tp_score_select` (one
        all_reduce) and all ranks keep the same tokens. num_heads: the heads of all ranks (default:
        the heads a rank hands in x the group's size). Hidden states are replicated under tensor
        parallelism, so compact / group_merge / restore run unchanged on every rank (and so does an
        ALVTS stage: its selector is replicated, every rank computes the same importance)."""
        if not isinstance(plan, (PruningPlan, RaggedPlan)):
            raise ValueError(f"plan: expected a PruningPlan or a RaggedPlan, got {type(plan).__name__}")
        self.plan, self.scale, self.backend = plan, scale, backend
        self.process_group, self.num_heads = process_group, num_heads
        self._tp = process_group is not None or num_heads is not None
        self._counts: dict = {}  # (stage, device) -> per-sample (keep, merge) int64 tensors

    def stage_counts(self, s: int, device) -> tuple[Tensor, Tensor]:
        """A RaggedPlan's stage s per-sample keep and merge counts, int64 [B] on `device` (made once)."""
        return self._stage_counts(s, device)[:2]

    def _stage_counts(self, s: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """stage_counts and their sum (each sample's rows of the new block), from the plan's ints: no op."""
        key = (s, str(device))
        if key not in self._counts:
            keep, merge = self.plan.counts(s)
            self._counts[key] = tuple(torch.tensor(c, dtype=torch.long, device=device)
                                      for c in (keep, merge, [k + m for k, m in zip(keep, merge)]))
        return self._counts[key]

    def select(self, seq: Sequence, s: int, q_last: Optional[Tensor], k: Optional[Tensor],
               scores: Optional[Tensor] = None) -> Sequence:
        """Stage s (0-based) on `seq`: score the visual block with q_last [B, H, D] and k [B, Hkv, n, D]
        (after RoPE; any strides), keep k_s tokens, and merge the rest into Z_s bypassing tokens or
        drop it. `scores` fp32 [B, M] replaces the model's own scores (analysis).

        An ALVTS stage (plan.layer_only(s)): q_last and k are the selector's queries and keys of every
        row, [B, 1, n, R] each; the k_s tokens of largest importance are kept for the stage's layer and
        the others are set aside until `restore`, which the caller runs right after that layer."""
        if isinstance(self.plan, RaggedPlan) or seq.vis_counts is not None:
            return self._select_ragged(seq, s, q_last, k, scores)
        stage, backend = self.plan.stages[s], self.backend
        layer_only = self.plan.layer_only(s)
        if scores is None and layer_only:
            scores = self._importance(q_last, k, seq, seq.vis_len)
        if scores is None:
            keep_idx, rest_idx, _ = self._score_select(q_last, k, seq.vis_start, seq.vis_len, stage.keep,  # Eq. 1-2
                                                       seq.key_mask)
        else:
            keep_idx, rest_idx = ops.topk_select(scores, stage.keep, backend=backend)
        kept = keep_idx if seq._full else seq.block_ids.gather(1, keep_idx)
        h, src, rest_h, merged_rows, inverse = ops.compact(seq.h, seq.vis_start, keep_idx, rest_idx, stage.merge,
                                                           backend=backend)
        new = Sequence(h, seq.vis_start, stage.keep + stage.merge, left_padded=seq.left_padded, kept=seq.kept + [kept],
                       src=src, _full=False, _block_ids=kept if stage.merge == 0 else None, _parent=seq._metadata())
        if seq.key_mask is not None:
            new.key_mask = seq.key_mask[:, :h.shape[1]] if seq.left_padded else seq.take_rows(seq.key_mask, src)
        new.carry = {name: new.take(x) for name, x in seq.carry.items()}
        if stage.merge:
            merged, group, _ = ops.group_merge(rest_h, stage.merge, backend=backend)  # Eq. 10-11
            B, n, d = h.shape
            h.view(B * n, d).index_copy_(0, merged_rows.view(-1), merged.view(B * stage.merge, d))
            new._bypass = _Bypass(seq._metadata(), inverse, rest_idx, rest_h, group, merged_rows, merged)
        elif layer_only:
            new._bypass = self._skipped(seq, inverse, rest_idx, rest_h, merged_rows)
        return new

    def _importance(self, q: Tensor, k: Tensor, seq: Sequence, vis_len, max_vis_len=None) -> Tensor:
        """ALVTS' importance of the visual block: t2v * v2v of attention_importance over every row, at
        the selector's scale R ** -0.5 (R = q.shape[-1], its rank)."""
        t2v, v2v = ops.attention_importance(q, k, seq.vis_start, vis_len, q.shape[-1] ** -0.5, seq.key_mask,
                                            max_vis_len=max_vis_len, backend=self.backend)
        return t2v * v2v

    @staticmethod
    def _skipped(seq: Sequence, inverse, rest_idx, rest_h, merged_rows) -> _Bypass:
        """What an ALVTS stage sets aside: the skipped rows, restored unchanged after its layer (Z = 0:
        merged_rows [B, 0], merged_then a [B, 0, d] view; restore does not read group, here rest_idx)."""
        return _Bypass(seq._metadata(), inverse, rest_idx, rest_h, rest_idx, merged_rows, rest_h[:, :0])

    def _score_select(self, q_last, k, vis_start, vis_len, keep, key_mask, **widths):
        """score_select on one rank, or across the tensor-parallel group (distributed.py)."""
        if self._tp:
            from ..distributed import tp_score_select
            return tp_score_select(q_last, k, vis_start, vis_len, keep, self.scale, key_mask,
                                   num_heads=self.num_heads, process_group=self.process_group,
                                   backend=self.backend, **widths)
        return ops.score_select(q_last, k, vis_start, vis_len, keep, self.scale, key_mask, backend=self.backend,
                                **widths)

    def _select_ragged(self, seq: Sequence, s: int, q_last, k, scores) -> Sequence:
        """select for a ragged batch: per-sample counts as tensors, the padded widths from the plan."""
        if not isinstance(self.plan, RaggedPlan):
            raise ValueError("plan: a ragged batch (Sequence.vis_counts given) needs a RaggedPlan of per-sample "
                             "counts, got a PruningPlan")
        B, n, d = seq.h.shape
        if len(self.plan.plans) != B:
            raise ValueError(f"plan: expected a RaggedPlan of {B} samples (the batch), got {len(self.plan.plans)}")
        stage, backend, dev = self.plan.stages[s], self.backend, seq.h.device
        keep_b, merge_b, rows_b = self._stage_counts(s, dev)
        counts = seq.vis_counts if seq.vis_counts is not None else torch.full((B,), seq.vis_len, device=dev)
        K, Z = stage.keep, stage.merge
        layer_only = self.plan.layer_only(s)
        if scores is None and layer_only:
            scores = self._importance(q_last, k, seq, counts, seq.vis_len)
        if scores is None:
            keep_idx, rest_idx, _ = self._score_select(q_last, k, seq.vis_start, counts, keep_b,  # Eq. 1-2
                                                       seq.key_mask, max_vis_len=seq.vis_len, max_keep=K)
        else:
            keep_idx, rest_idx = ops.topk_select(scores, keep_b, lengths=counts, max_k=K, backend=backend)
        kept = keep_idx if seq._full else torch.where(
            keep_idx >= 0, seq.block_ids.gather(1, keep_idx.clamp_min(0)), -1)
        h, src, rest_h, merged_rows, inverse = ops.compact(seq.h, seq.vis_start, keep_idx, rest_idx, merge_b,
                                                           max_merged=Z, backend=backend)
        rel = seq.block_place(n)[:, :h.shape[1]]  # made at the first stage (before the metadata kept below)
        new = Sequence(h, seq.vis_start, K + Z, kept=seq.kept + [kept], src=src, vis_counts=rows_b,
                       _full=False, _block_ids=kept if Z == 0 else None, _parent=seq._metadata(), _place=seq._place)
        # valid keys: the valid rows moved, less the block's padding rows (rel in [rows_b, K + Z))
        not_padding = (rel < rows_b[:, None]) | (rel >= K + Z)
        new.key_mask = seq.take_rows(seq.key_mask, src) & not_padding if seq.key_mask is not None else not_padding
        new.carry = {name: new.take(x) for name, x in seq.carry.items()}
        if Z:
            merged, group, _ = ops.group_merge(rest_h, merge_b, lengths=counts - keep_b, max_groups=Z,  # Eq. 10-11
                                               backend=backend)
            h.view(B * h.shape[1], d).index_copy_(0, merged_rows.view(-1), merged.view(B * Z, d))
            new._bypass = _Bypass(seq._metadata(), inverse, rest_idx, rest_h, group, merged_rows, merged)
        elif layer_only:
            new._bypass = self._skipped(seq, inverse, rest_idx, rest_h, merged_rows)
        return new

    def restore(self, seq: Sequence) -> Sequence:
        """Before a later SwiftVLM stage: the sequence the last merging stage compacted, every rest
        token back as h + merged_now - merged_then of its group (Eq. 12-13); right after an ALVTS
        stage's layer: the sequence before the stage, the skipped tokens back unchanged (Z = 0). A
        sequence that bypasses nothing is returned as it is."""
        bp = seq._bypass
        if bp is None:
            return seq
        h = ops.restore(seq.h, bp.inverse, seq.vis_start, bp.rest_idx, bp.rest_h, bp.group, bp.merged_rows,
                        bp.merged_then, backend=self.backend)
        return replace(bp.before, h=h, kept=seq.kept)  # (h set: __post_init__ records its size)
