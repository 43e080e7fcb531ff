"""Helpers shared by the Triton kernels: block sizes, the launch device, the output cast."""
import contextlib

import torch
import triton
import triton.language as tl


def pow2(n):
    """The smallest power of two >= max(n, 1): a Triton block size covering n elements."""
    return triton.next_power_of_2(max(int(n), 1))


def on_device(t):
    """Context that makes t's GPU the current one, so Triton launches there (no-op on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 x cast to dtype, rounding to nearest even (as torch does) for every output dtype."""
    if dtype == tl.bfloat16:
        # Round the fp32 bits to bf16's 8-bit mantissa first: the interpreter's bf16 cast truncates.
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, u.to(tl.float32, bitcast=True))
    return x.to(dtype)
