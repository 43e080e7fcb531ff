import pytest
import torch

import brute
import python_ref
from conftest import DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,Z,d", [(1, 1, 8), (7, 3, 33), (83, 83, 16)])
def test_against_brute_force(dtype, R, Z, d):
    g = torch.Generator().manual_seed(R + Z + d)
    h = torch.randn(3, R, d, generator=g).to(dtype)
    group = torch.randint(0, Z, (3, R), generator=g)
    now = torch.randn(3, Z, d, generator=g).to(dtype)
    then = torch.randn(3, Z, d, generator=g).to(dtype)
    out = python_ref.bypass_align(h, group, now, then)
    assert out.dtype == dtype and out.shape == (3, R, d)
    want = brute.bypass_align(h, group, now, then)
    # fp32 math, one rounding to the output dtype at the end
    torch.testing.assert_close(out, want.float().to(dtype), rtol=0, atol=0) if dtype != torch.float32 else \
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


def test_hand_computed():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    group = torch.tensor([[1, 0]])
    now = torch.tensor([[[10.0, 10.0], [20.0, 20.0]]])
    then = torch.tensor([[[9.0, 9.0], [18.0, 19.0]]])
    assert python_ref.bypass_align(h, group, now, then).tolist() == [[[3.0, 3.0], [4.0, 5.0]]]


def test_into_writes_only_the_given_rows():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 6, generator=g)
    group = torch.randint(0, 3, (2, 4), generator=g)
    now, then = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    dst = torch.full((2, 10, 6), 7.0)
    rows = torch.tensor([[0, 3, 4, 9], [1, 2, 5, 8]])
    python_ref.bypass_align_into(dst, rows, h, group, now, then)
    out = python_ref.bypass_align(h, group, now, then)
    for b in range(2):
        assert torch.equal(dst[b, rows[b]], out[b])
        untouched = [i for i in range(10) if i not in rows[b].tolist()]
        assert torch.all(dst[b, untouched] == 7.0)
