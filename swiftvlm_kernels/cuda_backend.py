"""The cuda backend: the compiled kernels of csrc/ (ops `torch.ops.swiftvlm.<op>_cuda`) behind the
backend protocol of docs/CONTRACT.md.

Where the library comes from: an extension built ahead of time (`swiftvlm_kernels/_C*.so`, from
`SWIFTVLM_BUILD_CUDA=1 pip install .` or CMake) when present; otherwise the first CUDA call compiles
csrc/ with ninja (swiftvlm_kernels/_build.py: cached per torch version, CUDA version, arch list and
source hash; one line is printed while it builds). Importing this module never fails, never prints
and never compiles: without a CUDA torch, a GPU, torch >= 2.10 or nvcc, `available()` is False,
`reason` says why, and every op raises a RuntimeError carrying that reason.

Ragged batches (per-sample counts as int tensors [B], the padded widths as trailing ints, as the
`.ragged` overloads pass them) run the same kernels in one launch sequence: each CTA reads its sample's
counts on the device (never on the host). Packed keys (tv_score_varlen / score_select_varlen) are read
in place through cu_seqlens (no unpacking): max_seqlen, when given, bounds every sample's keys and
sizes the grid; without it the grid covers all `total` packed keys (tiles past a sample's keys exit
at once).
"""
import glob
import os

import torch

from . import _build
from .schemas import OPS, SIGNATURES

__all__ = ["available", "reason", *OPS]

# the C++ ops of csrc/torch_bindings.cpp: one per padded op, one per ragged overload (the packed ops run
# the ragged ones with cu_seqlens)
_OPS = tuple(f"{op}_cuda" for op in OPS if "cu_seqlens" not in SIGNATURES[op].names) + tuple(
    f"{name.split('.')[0]}_ragged_cuda" for name in SIGNATURES if name.endswith(".ragged"))


def _check_ops(where: str) -> str:
    missing = [op for op in _OPS if not hasattr(torch.ops.swiftvlm, op)]
    return f"the CUDA library {where} lacks the ops {', '.join(missing)}; rebuild it" if missing else ""


def _load() -> str:
    """Load a prebuilt library, or decide whether a first-use build can run; return why the backend
    cannot run ("" when it can)."""
    global _pending
    here = os.path.dirname(os.path.abspath(__file__))
    libs = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if libs:
        try:
            torch.ops.load_library(libs[0])
        except OSError as e:
            return f"the CUDA extension {os.path.basename(libs[0])} failed to load ({e}); rebuild it against this torch"
        why = _check_ops(os.path.basename(libs[0]))
        if why:
            return why
    if torch.version.cuda is None:
        return "this torch has no CUDA (the cuda backend needs a CUDA build of torch >= 2.10)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not libs:
        if _build.torch_version() < _build.MIN_TORCH_FOR_CUDA:
            return f"the cuda backend needs torch >= 2.10 (its stable ABI), got {torch.__version__}"
        if _build.find_nvcc() is None:
            return ("the CUDA kernels compile on first use and nvcc was not found (install the CUDA toolkit or set "
                    "CUDA_HOME)")
        _pending = True  # compiled by the first call (_ops)
    return ""


_pending = False
reason = _load()


def available() -> bool:
    """True when the compiled ops can run here (a prebuilt library loaded, or a first-use build can
    run: a CUDA torch >= 2.10, a device and nvcc)."""
    return reason == ""


def _ops():
    global _pending, reason
    if reason:
        raise RuntimeError(f"swiftvlm cuda backend: {reason}")
    if _pending:
        try:
            _build.load()
        except Exception as e:  # the compile's own message (nvcc's log) is the useful part
            reason = f"building the CUDA kernels failed: {e}"
            raise RuntimeError(f"swiftvlm cuda backend: {reason}") from e
        why = _check_ops("built from csrc/")
        if why:
            reason = why
            raise RuntimeError(f"swiftvlm cuda backend: {why}")
        _pending = False
    return torch.ops.swiftvlm


def _width(name, given):
    """A ragged output's padded width: given by the caller (reading the counts would synchronise)."""
    if given is None:
        raise ValueError(f"{name}: expected the padded width (an int) with per-sample counts on the cuda backend")
    return int(given)


def tv_score(q, k, vis_start, vis_len, scale, key_mask=None, max_vis_len=None):
    if isinstance(vis_len, torch.Tensor):
        return _ops().tv_score_ragged_cuda(q, k, vis_start, vis_len, _width("max_vis_len", max_vis_len), float(scale),
                                           key_mask, None, 0)
    return _ops().tv_score_cuda(q, k, vis_start, int(vis_len), float(scale), key_mask)


def topk_select(scores, k, lengths=None, max_k=None):
    if isinstance(k, torch.Tensor):
        keep, rest = _ops().topk_select_ragged_cuda(scores, k, _width("max_k", max_k), lengths)
    elif lengths is not None:
        keep, rest = _ops().topk_select_ragged_cuda(scores, None, int(k), lengths)
    else:
        keep, rest = _ops().topk_select_cuda(scores, int(k))
    return keep, rest


def score_select(q, k, vis_start, vis_len, keep, scale, key_mask=None, max_vis_len=None, max_keep=None):
    if isinstance(vis_len, torch.Tensor) or isinstance(keep, torch.Tensor):
        return _score_select_ragged(q, k, vis_start, vis_len, keep, scale, key_mask, max_vis_len, max_keep, None, 0)
    keep_idx, rest_idx, scores = _ops().score_select_cuda(q, k, vis_start, int(vis_len), int(keep), float(scale),
                                                          key_mask)
    return keep_idx, rest_idx, scores


def _counts(value, q):
    """Per-sample counts as an int tensor [B] on q's device (an int: the same for every sample)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((q.shape[0],), int(value), dtype=torch.int64, device=q.device)


def _score_select_ragged(q, k, vis_start, vis_len, keep, scale, key_mask, max_vis_len, max_keep, cu_seqlens,
                         max_seqlen):
    W = int(vis_len) if not isinstance(vis_len, torch.Tensor) and max_vis_len is None else _width("max_vis_len",
                                                                                                   max_vis_len)
    K = int(keep) if not isinstance(keep, torch.Tensor) and max_keep is None else _width("max_keep", max_keep)
    keep_idx, rest_idx, scores = _ops().score_select_ragged_cuda(
        q, k, vis_start, _counts(vis_len, q), _counts(keep, q), W, K, float(scale), key_mask, cu_seqlens, max_seqlen)
    return keep_idx, rest_idx, scores


def tv_score_varlen(q, k, cu_seqlens, vis_start, vis_len, scale, max_vis_len=None, max_seqlen=None):
    W = int(vis_len) if not isinstance(vis_len, torch.Tensor) and max_vis_len is None else _width("max_vis_len",
                                                                                                   max_vis_len)
    L = k.shape[0] if max_seqlen is None else int(max_seqlen)
    return _ops().tv_score_ragged_cuda(q, k, vis_start, _counts(vis_len, q), W, float(scale), None, cu_seqlens, L)


def score_select_varlen(q, k, cu_seqlens, vis_start, vis_len, keep, scale, max_vis_len=None, max_keep=None,
                        max_seqlen=None):
    L = k.shape[0] if max_seqlen is None else int(max_seqlen)
    return _score_select_ragged(q, k, vis_start, vis_len, keep, scale, None, max_vis_len, max_keep, cu_seqlens, L)


def group_merge(h, num_groups, lengths=None, max_groups=None):
    if isinstance(num_groups, torch.Tensor):
        merged, group, counts = _ops().group_merge_ragged_cuda(h, num_groups, _width("max_groups", max_groups), lengths)
    elif lengths is not None:
        merged, group, counts = _ops().group_merge_ragged_cuda(h, None, int(num_groups), lengths)
    else:
        merged, group, counts = _ops().group_merge_cuda(h, int(num_groups))
    return merged, group, counts


def bypass_align(h_rest, group, merged_now, merged_then):
    return _ops().bypass_align_cuda(h_rest, group, merged_now, merged_then)


def bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then):
    _ops().bypass_align_into_cuda(dst, rows, h_rest, group, merged_now, merged_then)


def compact(h, vis_start, keep_idx, rest_idx, num_merged, max_merged=None):
    if isinstance(num_merged, torch.Tensor):
        return _ops().compact_ragged_cuda(h, vis_start, keep_idx, rest_idx, num_merged,
                                          _width("max_merged", max_merged))
    h_new, src, rest_h, merged_rows, inverse = _ops().compact_cuda(h, vis_start, keep_idx, rest_idx, int(num_merged))
    return h_new, src, rest_h, merged_rows, inverse


def attention_importance(q, k, vis_start, vis_len, scale, key_mask=None, max_vis_len=None):
    if isinstance(vis_len, torch.Tensor):
        t2v, v2v = _ops().attention_importance_ragged_cuda(q, k, vis_start, vis_len, _width("max_vis_len", max_vis_len),
                                                           float(scale), key_mask)
    else:
        t2v, v2v = _ops().attention_importance_cuda(q, k, vis_start, int(vis_len), float(scale), key_mask)
    return t2v, v2v


def restore(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then):
    return _ops().restore_cuda(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then)
