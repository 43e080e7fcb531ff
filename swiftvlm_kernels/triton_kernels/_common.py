"""Host-side launch helpers shared by the Triton kernels."""
import contextlib

import torch
import triton


def pow2(n):
    """The smallest power of two >= max(n, 1): a Triton block size covering n elements."""
    return triton.next_power_of_2(max(int(n), 1))


def on_device(t):
    """Context that makes t's GPU the current one, so Triton launches there (no-op on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
