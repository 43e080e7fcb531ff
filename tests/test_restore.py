"""restore (python_ref) against token-by-token brute force, and the round trip compact -> restore; with
Z = 0 (nothing merged: an ALVTS stage's skipped tokens) the rest tokens come back unchanged."""
import pytest
import torch

import brute
import python_ref
from conftest import DTYPES
from test_compact import SHAPES, split


def groups(B, R, Z, g):
    """Random group ids in [0, Z); with Z = 0 (not read) arbitrary values, out of range included."""
    return torch.randint(0, Z, (B, R), generator=g) if Z else torch.randint(-7, 50, (B, R), generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-n{}-d{}-M{}-k{}-Z{}".format(*s))
def test_restore_against_brute_force(shape, dtype):
    B, n, d, M, k, Z = shape
    g = torch.Generator().manual_seed(sum(shape) + 1)
    h = torch.randn(B, n, d, generator=g).to(dtype)
    vis_start = torch.randint(0, n - M + 1, (B,), generator=g)
    keep, rest = split(B, M, k, g)
    h_new, _, rest_h, merged_rows, inverse = python_ref.compact(h, vis_start, keep, rest, Z)
    later = torch.randn(h_new.shape, generator=g).to(dtype)  # the sequence after more layers
    group = groups(B, M - k, Z, g)
    then = torch.randn(B, Z, d, generator=g).to(dtype)
    got = python_ref.restore(later, inverse, vis_start, rest, rest_h, group, merged_rows, then)
    want = brute.restore(later, inverse, vis_start, rest, rest_h, group, merged_rows, then)
    assert got.dtype == dtype and got.shape == (B, n, d)
    # carried rows are copies; rest rows are fp32 math rounded once to the dtype
    torch.testing.assert_close(got, want.float().to(dtype), rtol=0, atol=0) if dtype != torch.float32 else \
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-n{}-d{}-M{}-k{}-Z{}".format(*s))
def test_restore_undoes_compact(shape):
    """With the merged tokens unchanged since they were made (no layer in between), restore gives the
    original sequence back exactly: the drift merged_now - merged_then is zero."""
    B, n, d, M, k, Z = shape
    g = torch.Generator().manual_seed(sum(shape) + 2)
    h = torch.randn(B, n, d, generator=g)
    vis_start = torch.randint(0, n - M + 1, (B,), generator=g)
    keep, rest = split(B, M, k, g)
    h_new, src, rest_h, merged_rows, inverse = python_ref.compact(h, vis_start, keep, rest, Z)
    if Z:
        merged, group, _ = python_ref.group_merge(rest_h, Z)
        h_new.view(-1, d).index_copy_(0, merged_rows.view(-1), merged.view(-1, d))
    else:  # nothing merged: group is not read
        merged, group = rest_h[:, :0], groups(B, M - k, 0, g)
    assert torch.equal(python_ref.restore(h_new, inverse, vis_start, rest, rest_h, group, merged_rows, merged), h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[5] == 0 and s[3] > s[4]],
                         ids=lambda s: "B{}-n{}-d{}-M{}-k{}".format(*s[:5]))
def test_restore_without_merged_tokens_puts_the_rest_back_unchanged(shape, dtype):
    """Z = 0 (merged_rows [B, 0], merged_then [B, 0, d]): the rest tokens come back as compact set them
    aside, bit for bit (-0.0, inf and NaN included), whatever group holds; the carried rows are the
    layer's."""
    B, n, d, M, k, _ = shape
    g = torch.Generator().manual_seed(sum(shape) + 3)
    h = torch.randn(B, n, d, generator=g).to(dtype)
    h[:, :, 0] = -0.0
    h[:, ::2, -1] = float("nan")
    h[:, 1::3, -1] = float("-inf")
    vis_start = torch.randint(0, n - M + 1, (B,), generator=g)
    keep, rest = split(B, M, k, g)
    h_new, _, rest_h, merged_rows, inverse = python_ref.compact(h, vis_start, keep, rest, 0)
    assert merged_rows.shape == (B, 0)
    later = h_new * 3 + 1  # a layer ran on the kept rows
    got = python_ref.restore(later, inverse, vis_start, rest, rest_h, groups(B, M - k, 0, g), merged_rows, rest_h[:, :0])
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    rest_rows = (vis_start[:, None] + rest).tolist()
    for b in range(B):
        for r in range(n):
            if r in rest_rows[b]:
                assert torch.equal(got[b, r].view(bits), rest_h[b, rest_rows[b].index(r)].view(bits)), (b, r)
                torch.testing.assert_close(got[b, r], h[b, r], rtol=0, atol=0, equal_nan=True)
            else:
                want = later[b, int(inverse[b, r]) - b * h_new.shape[1]]
                torch.testing.assert_close(got[b, r], want, rtol=0, atol=0, equal_nan=True)
