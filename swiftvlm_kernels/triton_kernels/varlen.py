"""Packed (varlen) batches on the triton backend: the keys gathered into the padded ragged form (one
gather, python_ref/varlen.py's `unpack`, padded to max_seqlen, or to all `total` packed keys when
max_seqlen is left out: no width is read from the device), then the ragged tv_score / score_select
kernels. The gather moves the keys once more than a kernel reading the packed rows would."""
from python_ref.varlen import unpack

from .score_select import score_select
from .tv_score import tv_score


def _padded(k, cu_seqlens, max_seqlen):
    return unpack(k, cu_seqlens, k.shape[0] if max_seqlen is None else max_seqlen)


def tv_score_varlen(q, k, cu_seqlens, vis_start, vis_len, scale: float, max_vis_len=None, max_seqlen=None):
    k_padded, mask = _padded(k, cu_seqlens, max_seqlen)
    return tv_score(q, k_padded, vis_start, vis_len, scale, mask, max_vis_len)


def score_select_varlen(q, k, cu_seqlens, vis_start, vis_len, keep, scale: float, max_vis_len=None, max_keep=None,
                        max_seqlen=None):
    k_padded, mask = _padded(k, cu_seqlens, max_seqlen)
    return score_select(q, k_padded, vis_start, vis_len, keep, scale, mask, max_vis_len, max_keep)
