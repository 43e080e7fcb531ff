"""score_select: tv_score then topk_select on its scores as ONE two-launch op.

Launch 1 is tv_score's split-K statistics and visual logits; launch 2 merges them into the fp32
scores the op returns (see tv_score.py), and the last of its programs to finish a sample (a per-sample
counter that launch 1 zeroes) reads that sample's score row back and selects on it with topk_select's
row helpers (topk_select.py): the row in registers up to topk_select.MAX_REGISTER_N scores, else in
chunks. No per-head probability tensor, no third launch, no host synchronisation.
"""
from .tv_score import visual_scores


def score_select(q, k, vis_start, vis_len, keep, scale: float, key_mask=None, max_vis_len=None, max_keep=None):
    """(keep_idx int64 [B, keep], rest_idx int64 [B, vis_len - keep], scores fp32 [B, vis_len]).

    Inputs as tv_score (read in place through their strides); indices are visual-token indices,
    each list ascending. Two launches, no host synchronisation. Ragged samples (vis_len / keep int
    tensors [B], widths max_vis_len / max_keep): python_ref.score_select's padded layout.
    """
    return visual_scores(q, k, vis_start, vis_len, scale, key_mask, keep=keep, max_vis_len=max_vis_len,
                         max_keep=max_keep)
