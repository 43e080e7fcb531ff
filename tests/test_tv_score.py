import math

import pytest
import torch

import brute
import python_ref
from conftest import DTYPES


def make(B, H, Hkv, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    return q, k


def test_hand_computed():
    # logits 0, ln 2, ln 3 -> probabilities 1/6, 2/6, 3/6
    q = torch.ones(1, 1, 1)
    k = torch.tensor([0.0, math.log(2), math.log(3)]).reshape(1, 1, 3, 1)
    s = python_ref.tv_score(q, k, torch.tensor([1]), 2, 1.0)
    torch.testing.assert_close(s, torch.tensor([[1 / 3, 1 / 2]]), rtol=1e-6, atol=1e-7)


def test_hand_computed_head_mean_and_mask():
    # head 0 attends uniformly; head 1 puts all weight on key 0; key 2 masked out
    q = torch.tensor([[[0.0], [100.0]]])
    k = torch.tensor([[[[1.0], [0.0], [0.5]]]])  # Hkv = 1 shared by both heads
    mask = torch.tensor([[True, True, False]])
    s = python_ref.tv_score(q, k, torch.tensor([0]), 3, 1.0, mask)
    torch.testing.assert_close(s, torch.tensor([[(0.5 + 1.0) / 2, 0.25, 0.0]]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (7, 1), (14, 2)])
def test_against_brute_force(dtype, H, Hkv):
    B, L, D, vis_len = 3, 23, 8, 11
    q, k = make(B, H, Hkv, L, D, dtype)
    vis_start = torch.tensor([0, 5, 12])
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, :1] = False
    mask[0, 4] = False  # a masked visual key scores 0
    scale = D ** -0.5
    got = python_ref.tv_score(q, k, vis_start, vis_len, scale, mask)
    assert got.dtype == torch.float32 and got.shape == (B, vis_len)
    # inputs are exact in fp32, so fp32 math must match float64 to fp32 rounding
    want = brute.tv_score(q, k, vis_start, vis_len, scale, mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert got[0, 4] == 0


def test_softmax_runs_over_all_keys_not_only_visual():
    q, k = make(1, 2, 2, 10, 4, torch.float32)
    s = python_ref.tv_score(q, k, torch.tensor([3]), 4, 0.5)
    assert float(s.sum()) < 1.0  # text keys take part of the probability mass
    full = python_ref.tv_score(q, k, torch.tensor([0]), 10, 0.5)
    torch.testing.assert_close(full.sum(), torch.tensor(1.0))


def test_all_keys_masked_gives_zeros():
    q, k = make(2, 2, 1, 6, 4, torch.float32)
    mask = torch.tensor([[False] * 6, [True] * 6])
    s = python_ref.tv_score(q, k, torch.tensor([0, 0]), 6, 1.0, mask)
    assert torch.all(s[0] == 0) and torch.isfinite(s).all()


def test_strided_keys():
    q, k = make(2, 4, 2, 9, 8, torch.float32)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, L, Hkv, D] storage
    vs = torch.tensor([1, 2])
    torch.testing.assert_close(python_ref.tv_score(q, k_t, vs, 5, 0.3), python_ref.tv_score(q, k, vs, 5, 0.3))


def test_vis_len_zero():
    q, k = make(2, 2, 2, 5, 4, torch.float32)
    assert python_ref.tv_score(q, k, torch.tensor([0, 1]), 0, 1.0).shape == (2, 0)
