"""compact and restore (python_ref) against token-by-token brute force, and their round trip."""
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[5] > 0], ids=lambda s: "B{}-n{}-d{}-M{}-k{}-Z{}".format(*s))
def test_restore_against_brute_force(shape, dtype):
    B, n, d, M, k, Z = shape
    g = torch.Generator().manual_seed(sum(shape) + 1)
    h = torch.randn(B, n, d, generator=g).to(dtype)
    vis_start = torch.randint(0, n - M + 1, (B,), generator=g)
    keep, rest = split(B, M, k, g)
    h_new, _, rest_h, merged_rows, inverse = python_ref.compact(h, vis_start, keep, rest, Z)
    later = torch.randn(h_new.shape, generator=g).to(dtype)  # the sequence after more layers
    group = torch.randint(0, Z, (B, M - k), generator=g)
    then = torch.randn(B, Z, d, generator=g).to(dtype)
    got = python_ref.restore(later, inverse, vis_start, rest, rest_h, group, merged_rows, then)
    want = brute.restore(later, inverse, vis_start, rest, rest_h, group, merged_rows, then)
    assert got.dtype == dtype and got.shape == (B, n, d)
    # carried rows are copies; rest rows are fp32 math rounded once to the dtype
    torch.testing.assert_close(got, want.float().to(dtype), rtol=0, atol=0) if dtype != torch.float32 else \
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[5] > 0], ids=lambda s: "B{}-n{}-d{}-M{}-k{}-Z{}".format(*s))
def test_restore_undoes_compact(shape):
    """With the merged tokens unchanged since they were made (no layer in between), restore gives the
    original sequence back exactly: the drift merged_now - merged_then is zero."""
    B, n, d, M, k, Z = shape
    g = torch.Generator().manual_seed(sum(shape) + 2)
    h = torch.randn(B, n, d, generator=g)
    vis_start = torch.randint(0, n - M + 1, (B,), generator=g)
    keep, rest = split(B, M, k, g)
    h_new, src, rest_h, merged_rows, inverse = python_ref.compact(h, vis_start, keep, rest, Z)
    merged, group, _ = python_ref.group_merge(rest_h, Z)
    h_new.view(-1, d).index_copy_(0, merged_rows.view(-1), merged.view(-1, d))
    assert torch.equal(python_ref.restore(h_new, inverse, vis_start, rest, rest_h, group, merged_rows, merged), h)


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
