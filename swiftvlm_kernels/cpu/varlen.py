"""Packed (varlen) batches on the CPU: the keys unpacked to the padded ragged form, then this backend's
tv_score / score_select (python_ref/varlen.py defines the layout)."""
from python_ref.varlen import unpack

from .score_select import score_select
from .tv_score import tv_score


def tv_score_varlen(q, k, cu_seqlens, vis_start, vis_len, scale: float, max_vis_len=None, max_seqlen=None):
    k_padded, mask = unpack(k, cu_seqlens, max_seqlen)
    return tv_score(q, k_padded, vis_start, vis_len, scale, mask, max_vis_len)


def score_select_varlen(q, k, cu_seqlens, vis_start, vis_len, keep, scale: float, max_vis_len=None, max_keep=None,
                        max_seqlen=None):
    k_padded, mask = unpack(k, cu_seqlens, max_seqlen)
    return score_select(q, k_padded, vis_start, vis_len, keep, scale, mask, max_vis_len, max_keep)
