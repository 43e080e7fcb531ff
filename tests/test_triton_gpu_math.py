"""The interpreter mode that computes fp32 exp2, division and sqrt as compiled Triton does
(tests/triton_gpu_math.py): results stay within the hardware's ulp bounds, subnormals flush to zero,
and under SWIFTVLM_TRITON_GPU_MATH=1 a Triton kernel really sees them."""
import os

import numpy as np
import pytest
import torch

import triton_gpu_math as gm


def test_nudged_results_stay_within_the_bounds_and_vary():
    x = np.linspace(-20, 20, 4001, dtype=np.float32)
    exact = np.exp2(x.astype(np.float64)).astype(np.float32)
    got = gm._nudge(exact, x, 2)
    ulp = np.abs(np.spacing(exact))
    assert np.all(np.abs(got.astype(np.float64) - exact) <= 2 * ulp + 1e-45)
    assert len(set(np.round((got.astype(np.float64) - exact) / ulp).tolist())) == 5  # -2..2 all occur
    assert np.array_equal(gm._nudge(exact, x, 2), got)  # deterministic


def test_subnormals_flush_to_zero():
    tiny = np.float32(np.finfo(np.float32).tiny)
    x = np.array([tiny / 4, -tiny / 8, tiny, 1.0], dtype=np.float32)
    assert gm._flush(x).tolist() == [0.0, -0.0, float(tiny), 1.0]
    assert np.array_equal(gm._nudge(np.array([np.inf, np.nan, 0.0], np.float32), np.ones(3, np.float32), 2)[[0, 2]],
                          np.array([np.inf, 0.0], np.float32))


@pytest.mark.skipif(os.environ.get("SWIFTVLM_TRITON_GPU_MATH") != "1" or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the GPU-math mode is on only with SWIFTVLM_TRITON_GPU_MATH=1 under the interpreter")
def test_a_triton_kernel_sees_the_gpu_math():
    import triton
    import triton.language as tl

    @triton.jit
    def k(x_ptr, y_ptr, z_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n)
        tl.store(y_ptr + i, tl.exp2(x), mask=i < n)
        tl.store(z_ptr + i, 1.0 / (x + 3.0), mask=i < n)

    x = torch.linspace(-10, 10, 1024)
    y, z = torch.empty_like(x), torch.empty_like(x)
    k[(1,)](x, y, z, 1024, BLOCK=1024)
    exact_y, exact_z = torch.exp2(x.double()).float(), (1 / (x.double() + 3)).float()
    assert not torch.equal(y, exact_y) and not torch.equal(z, exact_z)
    torch.testing.assert_close(y, exact_y, rtol=2.5e-7, atol=0)
