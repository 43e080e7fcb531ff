"""score_select: tv_score then topk_select on its scores, three launches in all.

Scoring is split-K statistics (launch 1) and the visual scores (launch 2, see tv_score.py): no
per-head probability tensor is written, only [B, H, num_splits] statistics and the fp32 scores that
the op returns anyway. Launch 3 selects on those scores (topk_select.py).
"""
from .topk_select import topk_select
from .tv_score import tv_score


def score_select(q, k, vis_start, vis_len: int, keep: int, scale: float, key_mask=None):
    """(keep_idx int64 [B, keep], rest_idx int64 [B, vis_len - keep], scores fp32 [B, vis_len]).

    Inputs as tv_score (read in place through their strides); indices are visual-token indices,
    each list ascending. Three launches, no host synchronisation.
    """
    scores = tv_score(q, k, vis_start, vis_len, scale, key_mask)
    keep_idx, rest_idx = topk_select(scores, keep)
    return keep_idx, rest_idx, scores
