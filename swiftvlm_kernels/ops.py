"""The swiftvlm ops: `torch.library` custom ops in namespace `swiftvlm`, their fake (meta)
implementations, and thin Python wrappers.

Each op validates its input (`_checks`), picks the backend (`_backend`) and runs it. The last schema
argument, `backend` (None | "auto" | "torch" | "triton" | "cuda"), overrides SWIFTVLM_BACKEND for
one call; it is a trace-time constant under torch.compile.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks
from ._backend import resolve

_LIB = "swiftvlm"


@torch.library.custom_op(f"{_LIB}::tv_score", mutates_args=())
def _tv_score(q: Tensor, k: Tensor, vis_start: Tensor, vis_len: int, scale: float,
              key_mask: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    _checks.check_tv_score(q, k, vis_start, vis_len, scale, key_mask)
    return resolve("tv_score", q.device, backend).tv_score(q, k, vis_start, vis_len, scale, key_mask)


@_tv_score.register_fake
def _(q, k, vis_start, vis_len, scale, key_mask=None, backend=None):
    _checks.check_tv_score(q, k, vis_start, vis_len, scale, key_mask)
    return q.new_empty((q.shape[0], vis_len), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::topk_select", mutates_args=())
def _topk_select(scores: Tensor, k: int, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    _checks.check_topk_select(scores, k)
    return resolve("topk_select", scores.device, backend).topk_select(scores, k)


@_topk_select.register_fake
def _(scores, k, backend=None):
    _checks.check_topk_select(scores, k)
    B, N = scores.shape
    return scores.new_empty((B, k), dtype=torch.int64), scores.new_empty((B, N - k), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::score_select", mutates_args=())
def _score_select(q: Tensor, k: Tensor, vis_start: Tensor, vis_len: int, keep: int, scale: float,
                  key_mask: Optional[Tensor] = None, backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.check_score_select(q, k, vis_start, vis_len, keep, scale, key_mask)
    impl = resolve("score_select", q.device, backend)
    return impl.score_select(q, k, vis_start, vis_len, keep, scale, key_mask)


@_score_select.register_fake
def _(q, k, vis_start, vis_len, keep, scale, key_mask=None, backend=None):
    _checks.check_score_select(q, k, vis_start, vis_len, keep, scale, key_mask)
    B = q.shape[0]
    return (q.new_empty((B, keep), dtype=torch.int64), q.new_empty((B, vis_len - keep), dtype=torch.int64),
            q.new_empty((B, vis_len), dtype=torch.float32))


@torch.library.custom_op(f"{_LIB}::group_merge", mutates_args=())
def _group_merge(h: Tensor, num_groups: int, backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.check_group_merge(h, num_groups)
    return resolve("group_merge", h.device, backend).group_merge(h, num_groups)


@_group_merge.register_fake
def _(h, num_groups, backend=None):
    _checks.check_group_merge(h, num_groups)
    B, R, d = h.shape
    return (h.new_empty((B, num_groups, d)), h.new_empty((B, R), dtype=torch.int64),
            h.new_empty((B, num_groups), dtype=torch.int32))


@torch.library.custom_op(f"{_LIB}::bypass_align", mutates_args=())
def _bypass_align(h_rest: Tensor, group: Tensor, merged_now: Tensor, merged_then: Tensor,
                  backend: Optional[str] = None) -> Tensor:
    _checks.check_bypass_align(h_rest, group, merged_now, merged_then)
    return resolve("bypass_align", h_rest.device, backend).bypass_align(h_rest, group, merged_now, merged_then)


@_bypass_align.register_fake
def _(h_rest, group, merged_now, merged_then, backend=None):
    _checks.check_bypass_align(h_rest, group, merged_now, merged_then)
    return torch.empty_like(h_rest, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{_LIB}::bypass_align_into", mutates_args=("dst",))
def _bypass_align_into(dst: Tensor, rows: Tensor, h_rest: Tensor, group: Tensor, merged_now: Tensor,
                       merged_then: Tensor, backend: Optional[str] = None) -> None:
    _checks.check_bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then)
    impl = resolve("bypass_align_into", h_rest.device, backend)
    impl.bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then)


@_bypass_align_into.register_fake
def _(dst, rows, h_rest, group, merged_now, merged_then, backend=None):
    _checks.check_bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then)


# ---- Python wrappers: the same ops with defaults and a keyword-only backend switch ----

def tv_score(q, k, vis_start, vis_len, scale=None, key_mask=None, *, backend=None):
    """fp32 [B, vis_len]: last-token attention to each visual token, averaged over heads (Eq. 1-2).

    q [B, H, D], k [B, Hkv, L, D] (H % Hkv == 0), vis_start int [B], key_mask bool [B, L] or None.
    scale defaults to D ** -0.5.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.swiftvlm.tv_score(q, k, vis_start, vis_len, scale, key_mask, backend)


def topk_select(scores, k, *, backend=None):
    """(keep int64 [B, k], rest int64 [B, N - k]), both in ascending index order."""
    return torch.ops.swiftvlm.topk_select(scores, k, backend)


def score_select(q, k, vis_start, vis_len, keep, scale=None, key_mask=None, *, backend=None):
    """topk_select(tv_score(...), keep) as one op: (keep_idx, rest_idx, scores)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.swiftvlm.score_select(q, k, vis_start, vis_len, keep, scale, key_mask, backend)


def group_merge(h, num_groups, *, backend=None):
    """(merged [B, Z, d], group int64 [B, R], counts int32 [B, Z]) (Eq. 10-11)."""
    return torch.ops.swiftvlm.group_merge(h, num_groups, backend)


def bypass_align(h_rest, group, merged_now, merged_then, *, backend=None):
    """h_rest + merged_now[group] - merged_then[group], fp32 math (Eq. 12-13)."""
    return torch.ops.swiftvlm.bypass_align(h_rest, group, merged_now, merged_then, backend)


def bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then, *, backend=None):
    """Write bypass_align(...)[b, i] into dst[b, rows[b, i]] in place; returns dst."""
    torch.ops.swiftvlm.bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then, backend)
    return dst
