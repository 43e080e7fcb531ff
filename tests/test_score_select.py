import pytest
import torch

import python_ref
from conftest import DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep", [0, 1, 6, 13])
def test_is_topk_of_tv_score(dtype, keep):
    g = torch.Generator().manual_seed(keep)
    B, H, Hkv, L, D, vis_len = 3, 6, 2, 30, 8, 13
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    vis_start = torch.tensor([2, 9, 17])
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :2] = False
    keep_idx, rest_idx, scores = python_ref.score_select(q, k, vis_start, vis_len, keep, 0.35, mask)
    want_scores = python_ref.tv_score(q, k, vis_start, vis_len, 0.35, mask)
    assert torch.equal(scores, want_scores)
    want_keep, want_rest = python_ref.topk_select(want_scores, keep)
    assert torch.equal(keep_idx, want_keep) and torch.equal(rest_idx, want_rest)
    assert keep_idx.shape == (B, keep) and rest_idx.shape == (B, vis_len - keep)
    if keep:
        # every kept token scores at least as much as every rest token
        kept_min = scores.gather(1, keep_idx).min(1).values
        rest_max = scores.gather(1, rest_idx).max(1).values if keep < vis_len else kept_min
        assert torch.all(kept_min >= rest_max)
