import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import brute
import python_ref
from conftest import DTYPES

NAN, INF = math.nan, math.inf


def check(scores, k):
    keep, rest = python_ref.topk_select(scores, k)
    want_keep, want_rest = brute.topk_select(scores, k)
    assert keep.dtype == torch.int64 and rest.dtype == torch.int64
    assert torch.equal(keep, want_keep) and torch.equal(rest, want_rest)
    return keep, rest


def test_hand_computed_ties_nan_inf():
    s = torch.tensor([[1.0, NAN, 3.0, 3.0, -INF, 0.0, -0.0, 3.0]])
    keep, rest = check(s, 3)
    assert keep.tolist() == [[2, 3, 7]]
    keep, _ = check(s, 5)
    assert keep.tolist() == [[0, 2, 3, 5, 7]]  # +0.0 and -0.0 tie: lower index wins
    keep, _ = check(s, 7)
    assert keep.tolist() == [[0, 2, 3, 4, 5, 6, 7]]  # NaN ranks below -inf
    assert check(s, 8)[1].shape == (1, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 7, 33, 83, 256, 257])
def test_against_sort(dtype, N):
    g = torch.Generator().manual_seed(N)
    scores = torch.randn(3, N, generator=g).to(dtype)
    scores[:, ::5] = scores[:, :1].clone()  # plenty of ties
    for k in sorted({0, 1, N // 3, N - 1, N} - {-1}):
        keep, rest = check(scores, k)
        assert torch.equal(torch.sort(torch.cat([keep, rest], 1), 1).values, torch.arange(N).expand(3, N))


def test_all_equal_and_all_nan():
    keep, rest = check(torch.full((2, 9), 0.5), 4)
    assert keep.tolist() == [[0, 1, 2, 3]] * 2
    keep, rest = check(torch.full((1, 6), NAN), 2)
    assert keep.tolist() == [[0, 1]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 2.5, 1e-30]), min_size=1, max_size=40),
       st.data())
def test_hypothesis_special_values(values, data):
    k = data.draw(st.integers(0, len(values)))
    check(torch.tensor([values, values[::-1]]), k)
