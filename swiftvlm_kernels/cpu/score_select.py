from .topk_select import topk_select
from .tv_score import tv_score


def score_select(q, k, vis_start, vis_len: int, keep: int, scale: float, key_mask=None):
    """topk_select(tv_score(...), keep): (keep_idx [B, keep], rest_idx [B, vis_len - keep], scores fp32)."""
    scores = tv_score(q, k, vis_start, vis_len, scale, key_mask)
    keep_idx, rest_idx = topk_select(scores, keep)
    return keep_idx, rest_idx, scores
