"""The cuda backend: the compiled kernels of csrc/ (ops `torch.ops.swiftvlm.<op>_cuda`) behind the
backend protocol of docs/CONTRACT.md.

The extension `swiftvlm_kernels/_C*.so` is built by setup.py only when torch has CUDA. Importing this
module never fails and never prints: without the library, or without a GPU, `available()` is False,
`reason` says why, and every op raises a RuntimeError carrying that reason.
"""
import glob
import os

import torch

__all__ = ["available", "reason", "tv_score", "topk_select", "score_select", "group_merge", "bypass_align",
           "bypass_align_into", "compact", "restore"]

_OPS = ("tv_score_cuda", "topk_select_cuda", "score_select_cuda", "group_merge_cuda", "bypass_align_cuda",
        "bypass_align_into_cuda", "compact_cuda", "restore_cuda")


def _load():
    """Load the compiled library; return why the backend cannot run ("" when it can)."""
    here = os.path.dirname(os.path.abspath(__file__))
    libs = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not libs:
        return ("the CUDA extension swiftvlm_kernels._C was not built (setup.py builds it only when torch has "
                "CUDA and SWIFTVLM_NO_CUDA is unset; rebuild with `pip install -e . --no-build-isolation` "
                "on a machine with a CUDA torch and nvcc)")
    try:
        torch.ops.load_library(libs[0])
    except OSError as e:
        return f"the CUDA extension {os.path.basename(libs[0])} failed to load ({e}); rebuild it against this torch"
    missing = [op for op in _OPS if not hasattr(torch.ops.swiftvlm, op)]
    if missing:
        return f"the CUDA extension {os.path.basename(libs[0])} lacks the ops {', '.join(missing)}; rebuild it"
    if not torch.cuda.is_available():
        return "the CUDA extension is built but torch sees no CUDA device"
    return ""


reason = _load()


def available():
    """True when the compiled ops can run here (library loaded and a CUDA device present)."""
    return reason == ""


def _ops():
    if reason:
        raise RuntimeError(f"swiftvlm cuda backend: {reason}")
    return torch.ops.swiftvlm


def tv_score(q, k, vis_start, vis_len, scale, key_mask=None):
    return _ops().tv_score_cuda(q, k, vis_start, int(vis_len), float(scale), key_mask)


def topk_select(scores, k):
    keep, rest = _ops().topk_select_cuda(scores, int(k))
    return keep, rest


def score_select(q, k, vis_start, vis_len, keep, scale, key_mask=None):
    keep_idx, rest_idx, scores = _ops().score_select_cuda(q, k, vis_start, int(vis_len), int(keep), float(scale),
                                                          key_mask)
    return keep_idx, rest_idx, scores


def group_merge(h, num_groups):
    merged, group, counts = _ops().group_merge_cuda(h, int(num_groups))
    return merged, group, counts


def bypass_align(h_rest, group, merged_now, merged_then):
    return _ops().bypass_align_cuda(h_rest, group, merged_now, merged_then)


def bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then):
    _ops().bypass_align_into_cuda(dst, rows, h_rest, group, merged_now, merged_then)


def compact(h, vis_start, keep_idx, rest_idx, num_merged):
    h_new, src, rest_h, merged_rows, inverse = _ops().compact_cuda(h, vis_start, keep_idx, rest_idx, int(num_merged))
    return h_new, src, rest_h, merged_rows, inverse


def restore(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then):
    return _ops().restore_cuda(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then)
