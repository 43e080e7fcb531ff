"""restore (python_ref) against token-by-token brute force, and the round trip compact -> restore."""
import pytest
import torch

import brute
import python_ref
from conftest import DTYPES
from test_compact import SHAPES, split


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
