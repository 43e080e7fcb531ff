"""compact (python_ref) against token-by-token brute force (restore and the round trip: test_restore.py)."""
import pytest
import torch

import brute
import python_ref
from conftest import DTYPES


def split(B, M, k, g):
    """Random (keep_idx, rest_idx) partitions of 0..M-1, both ascending, as score_select returns."""
    perm = torch.stack([torch.randperm(M, generator=g) for _ in range(B)])
    return perm[:, :k].sort(1).values, perm[:, k:].sort(1).values


# (B, n, d, M, k, Z): merge (Z >= 1), drop (Z = 0), all kept, none kept, Z = R, one rest token
SHAPES = [(3, 20, 5, 12, 4, 3), (2, 9, 3, 5, 2, 0), (2, 10, 4, 10, 10, 0), (2, 15, 6, 7, 0, 2),
          (1, 12, 2, 6, 1, 5), (2, 8, 3, 4, 3, 1), (3, 83, 7, 40, 13, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-n{}-d{}-M{}-k{}-Z{}".format(*s))
def test_compact_against_brute_force(shape, dtype):
    B, n, d, M, k, Z = shape
    g = torch.Generator().manual_seed(sum(shape))
    h = torch.randn(B, n, d, generator=g).to(dtype)
    vis_start = torch.randint(0, n - M + 1, (B,), generator=g)
    keep, rest = split(B, M, k, g)
    got = python_ref.compact(h, vis_start, keep, rest, Z)
    want = brute.compact(h, vis_start, keep, rest, Z)
    for name, a, b in zip(("h_new", "src", "rest_h", "merged_rows", "inverse"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_hand_computed():
    """n = 8, the block is rows 2..6 (slots 0..4); keep slots 1, 4; rest 0, 2, 3 merged into Z = 2
    tokens whose targets are rest #0 (slot 0) and #1 (slot 2)."""
    h = torch.arange(8.0)[None, :, None]
    h_new, src, rest_h, merged_rows, inverse = python_ref.compact(h, torch.tensor([2]), torch.tensor([[1, 4]]),
                                                                  torch.tensor([[0, 2, 3]]), 2)
    assert h_new.flatten().tolist() == [0, 1, 2, 3, 4, 6, 7]  # text 0 1, block slots 0 1 2 4, text 7
    assert src.tolist() == [[0, 1, 2, 3, 4, 6, 7]]
    assert rest_h.flatten().tolist() == [2, 4, 5]
    assert merged_rows.tolist() == [[2, 4]]
    assert inverse.tolist() == [[0, 1, -1, 3, -1, -1, 5, 6]]
