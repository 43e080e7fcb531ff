"""Make the Triton interpreter compute fp32 exp2, division and sqrt as the compiled kernels do.

The interpreter computes them exactly (numpy). Compiled for NVIDIA GPUs, `tl.exp2` is ex2.approx,
`/` on fp32 is div.full and `tl.sqrt` is sqrt.approx, each with .ftz: results a few ulp off the exact
value (PTX ISA: ex2.approx up to 2 ulp in practice, div.full 2 ulp, sqrt.approx 1 ulp) and subnormal
inputs and results flushed to zero. Exact arithmetic can hide a test that only passes on the last ulp
(a near-tie that flips). In this mode (SWIFTVLM_TRITON_GPU_MATH=1, set by tests/conftest.py) each
such fp32 result is the exactly rounded value moved by a deterministic pseudo-random number of ulp
within those bounds, with subnormals flushed: the tests must hold for any result the hardware may
give. fp64 arithmetic (group_merge's cosines) is IEEE on the GPU too and stays exact.
"""
import numpy as np

ULPS = {"exp2": 2, "fdiv": 2, "sqrt": 1}
_TINY = np.float32(np.finfo(np.float32).tiny)


def _flush(x):
    """Subnormal fp32 values to (signed) zero."""
    return np.where(np.abs(x) < _TINY, np.copysign(np.float32(0), x), x).astype(np.float32)


def _nudge(exact, key, ulps):
    """exact (fp32) moved by -ulps..ulps ulp, chosen by a hash of key's bits; inf and NaN kept."""
    bits = key.view(np.uint32).astype(np.uint64)
    h = (bits * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(59)  # 5 well-mixed bits
    steps = (h % np.uint64(2 * ulps + 1)).astype(np.int64) - ulps
    out = exact.copy()
    finite = np.isfinite(exact) & (exact != 0)
    for _ in range(ulps):
        up, down = steps > 0, steps < 0
        out = np.where(finite & up, np.nextafter(out, np.float32(np.inf)), out)
        out = np.where(finite & down, np.nextafter(out, np.float32(-np.inf)), out)
        steps = steps - np.sign(steps)
    return _flush(out.astype(np.float32))


def install():
    """Patch the interpreter's builder (idempotent)."""
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    if getattr(InterpreterBuilder, "_swiftvlm_gpu_math", False):
        return

    def unary(name, exact_fn):
        original = getattr(InterpreterBuilder, f"create_{name}")

        def create(self, arg):
            if arg.data.dtype != np.float32:
                return original(self, arg)
            x = _flush(arg.data)
            with np.errstate(all="ignore"):
                exact = exact_fn(x.astype(np.float64)).astype(np.float32)
            return TensorHandle(_nudge(exact, x, ULPS[name]), arg.dtype.scalar)
        setattr(InterpreterBuilder, f"create_{name}", create)

    unary("exp2", np.exp2)
    unary("sqrt", np.sqrt)
    original_fdiv = InterpreterBuilder.create_fdiv

    def create_fdiv(self, lhs, rhs):
        if lhs.data.dtype != np.float32 or rhs.data.dtype != np.float32:
            return original_fdiv(self, lhs, rhs)
        a, b = np.broadcast_arrays(_flush(lhs.data), _flush(rhs.data))
        with np.errstate(all="ignore"):
            exact = (a.astype(np.float64) / b.astype(np.float64)).astype(np.float32)
        key = (a.view(np.uint32) ^ (b.view(np.uint32) * np.uint32(2654435761))).astype(np.uint32).view(np.float32)
        return TensorHandle(_nudge(exact, key, ULPS["fdiv"]), lhs.dtype.scalar)

    InterpreterBuilder.create_fdiv = create_fdiv
    InterpreterBuilder._swiftvlm_gpu_math = True
