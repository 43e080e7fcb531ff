import torch

from .topk_select import topk_select
from .tv_score import tv_score


def score_select(q, k, vis_start, vis_len, keep, scale: float, key_mask=None, max_vis_len=None, max_keep=None):
    """topk_select(tv_score(...), keep): (keep_idx [B, keep], rest_idx [B, vis_len - keep], scores fp32);
    ragged (tensor vis_len / keep): python_ref.score_select's padded layout."""
    scores = tv_score(q, k, vis_start, vis_len, scale, key_mask, max_vis_len)
    if isinstance(vis_len, torch.Tensor) or isinstance(keep, torch.Tensor):
        keep_idx, rest_idx = topk_select(scores, keep, vis_len if isinstance(vis_len, torch.Tensor) else None,
                                         max_keep)
    else:
        keep_idx, rest_idx = topk_select(scores, keep)
    return keep_idx, rest_idx, scores
