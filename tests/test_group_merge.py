import pytest
import torch

import brute
import python_ref
from conftest import DTYPES


def test_targets():
    assert python_ref.group_targets(10, 3).tolist() == [0, 3, 6]
    assert python_ref.group_targets(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert python_ref.group_targets(7, 1).tolist() == [0]


def test_hand_computed():
    # targets 0 and 2 (R = 4, Z = 2); token 1 is closer to target 2, token 3 to target 0
    h = torch.tensor([[[1.0, 0.0], [0.1, 1.0], [0.0, 2.0], [3.0, 0.2]]])
    merged, group, counts = python_ref.group_merge(h, 2)
    assert group.tolist() == [[0, 1, 1, 0]]
    assert counts.tolist() == [[2, 2]] and counts.dtype == torch.int32
    torch.testing.assert_close(merged, torch.tensor([[[2.0, 0.1], [0.05, 1.5]]]))


def test_tie_goes_to_lowest_group_and_targets_keep_their_group():
    # token 1 is equally similar to both targets (which are identical): lowest z wins;
    # target 2 duplicates target 0 but still leads group 1.
    h = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]]])
    merged, group, counts = python_ref.group_merge(h, 2)  # targets 0, 1 -> floor(z*3/2) = 0, 1
    assert group.tolist() == [[0, 1, 0]]
    h = torch.tensor([[[1.0, 0.0], [5.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    merged, group, counts = python_ref.group_merge(h, 2)  # targets 0, 2; token 3 ties? no: sim 1 vs 0
    assert group.tolist() == [[0, 0, 1, 0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,Z", [(1, 1), (7, 1), (7, 7), (33, 4), (83, 9)])
def test_against_brute_force(dtype, R, Z):
    g = torch.Generator().manual_seed(R * 100 + Z)
    h = torch.randn(3, R, 16, generator=g).to(dtype)
    merged, group, counts = python_ref.group_merge(h, Z)
    want_merged, want_group, want_counts = brute.group_merge(h, Z)
    assert torch.equal(group, want_group)
    assert torch.equal(counts, want_counts)
    assert merged.dtype == dtype and merged.shape == (3, Z, 16)
    # the fp32 mean rounded once to the output dtype
    torch.testing.assert_close(merged, want_merged.to(dtype), rtol=0, atol=0) if dtype != torch.float32 else \
        torch.testing.assert_close(merged.double(), want_merged, rtol=1e-6, atol=1e-6)
    assert torch.all(counts >= 1) and torch.all(counts.sum(1) == R)


def test_singleton_groups_are_identity():
    h = torch.randn(2, 9, 5)
    merged, group, counts = python_ref.group_merge(h, 9)
    assert torch.equal(group, torch.arange(9).expand(2, 9))
    assert torch.equal(merged, h) and torch.all(counts == 1)


def test_zero_and_nan_tokens():
    h = torch.randn(1, 6, 4)
    h[0, 1] = 0.0  # similarity 0 to every target
    h[0, 3] = float("nan")  # NaN similarity ranks lowest: ties at -inf go to z = 0
    merged, group, counts = python_ref.group_merge(h, 2)  # targets 0, 3
    want_merged, want_group, _ = brute.group_merge(h, 2)
    assert torch.equal(group, want_group)
    assert group[0, 3] == 1  # the target keeps its own group even when NaN
