"""The packed (varlen) layout of FlashAttention and vLLM: the tokens of all samples concatenated
without padding, sample b's keys at rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1 of k [total, Hkv, D]."""
import torch

from .score_select import score_select
from .tv_score import padded_width, tv_score


def unpack(k, cu_seqlens, max_seqlen=None):
    """(k_padded [B, Hkv, max_seqlen, D], key_mask bool [B, max_seqlen]) of a packed k [total, Hkv, D]."""
    cu = cu_seqlens.to(device=k.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    L = padded_width(lengths, max_seqlen)
    j = torch.arange(L, device=k.device)
    mask = j[None, :] < lengths[:, None]
    rows = (cu[:-1, None] + j).clamp(0, max(k.shape[0] - 1, 0))
    padded = k[rows] if k.shape[0] else k.new_zeros(len(lengths), L, *k.shape[1:])
    padded = torch.where(mask[:, :, None, None], padded, 0)
    return padded.permute(0, 2, 1, 3), mask


def tv_score_varlen(q, k, cu_seqlens, vis_start, vis_len, scale: float, max_vis_len=None, max_seqlen=None):
    """tv_score on packed keys: q [B, H, D] (each sample's last token), k [total, Hkv, D], cu_seqlens
    int32 [B + 1] (ascending, cu_seqlens[0] = 0, cu_seqlens[B] = total), vis_start [B] relative to each
    sample's first token, vis_len an int tensor [B]. Returns fp32 [B, max_vis_len], as tv_score on the
    same samples padded (keys past each sample's length masked)."""
    k_padded, mask = unpack(k, cu_seqlens, max_seqlen)
    return tv_score(q, k_padded, vis_start, vis_len, scale, mask, max_vis_len)


def score_select_varlen(q, k, cu_seqlens, vis_start, vis_len, keep, scale: float, max_vis_len=None, max_keep=None,
                        max_seqlen=None):
    """score_select on packed keys (arguments as tv_score_varlen, keep an int tensor [B]): keep_idx
    [B, max_keep], rest_idx and scores [B, max_vis_len], as the padded ragged form."""
    k_padded, mask = unpack(k, cu_seqlens, max_seqlen)
    return score_select(q, k_padded, vis_start, vis_len, keep, scale, mask, max_vis_len, max_keep)
