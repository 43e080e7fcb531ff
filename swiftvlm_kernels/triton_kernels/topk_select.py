"""topk_select: split 0..N-1 into the k best-scored indices and the rest, both in position order.

One launch, one program per sample. The k-th largest score is found as an exact radix select over an
order-preserving 32-bit image of the scores (RADIX_BITS bits per pass, 32 / RADIX_BITS counting
passes over the row); a last pass writes keep and rest in index order with prefix sums. No sort,
no host synchronisation, any N and any 0 <= k <= N.
"""
import torch
import triton
import triton.language as tl

from ._common import on_device, pow2

RADIX_BITS = 4
MAX_BLOCK_N = 1024


@triton.jit
def _sortable_key(x):
    """uint32 image of fp32 x with the order of the scores: -0.0 ties +0.0, NaN below -inf."""
    u = x.to(tl.uint32, bitcast=True)
    key = tl.where((u >> 31) != 0, ~u, u | 0x80000000)  # negatives: flip all bits; positives: set the sign
    key = tl.where(x == 0.0, 0x80000000, key)
    return tl.where(x != x, 0, key)


@triton.jit
def _load_keys(row_ptr, idx, N, stride_n):
    return _sortable_key(tl.load(row_ptr + idx * stride_n, mask=idx < N, other=0.0).to(tl.float32))


@triton.jit
def _topk_select_kernel(scores_ptr, keep_ptr, rest_ptr, N, K, stride_b, stride_n,
                        BLOCK_N: tl.constexpr, RADIX_BITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row_ptr = scores_ptr + b * stride_b
    offs = tl.arange(0, BLOCK_N)
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.uint32)

    # Radix select of the K-th largest key T, high bits first. Invariant: T lies in
    # [prefix, prefix + (1 << (shift + RADIX_BITS))) and `above` keys lie past that bucket.
    prefix = tl.zeros([1], dtype=tl.uint32)
    above = tl.zeros([1], dtype=tl.int32)
    for p in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (p + 1)
        bounds = prefix | (digits << shift)
        at_least = tl.zeros([1 << RADIX_BITS], dtype=tl.int32)  # at_least[j] = #keys >= bounds[j]
        for start in range(0, N, BLOCK_N):
            idx = start + offs
            key = _load_keys(row_ptr, idx, N, stride_n)
            ge = (key[None, :] >= bounds[:, None]) & (idx < N)[None, :]
            at_least += tl.sum(ge.to(tl.int32), axis=1)
        # the largest digit whose bucket start still has >= K keys at or above it (K = 0 -> all ones)
        digit = tl.sum((at_least >= K).to(tl.int32), axis=0) - 1
        next_count = tl.sum(tl.where(digits.to(tl.int32) == digit + 1, at_least, 0), axis=0)
        above = tl.where(digit + 1 < (1 << RADIX_BITS), next_count, above)
        prefix = prefix | (digit.to(tl.uint32) << shift)

    # keys > T are kept; of the keys == T, the lowest-index K - above ones (ties: lower index wins)
    need_eq = K - above
    n_keep = tl.zeros([1], dtype=tl.int32)
    n_eq = tl.zeros([1], dtype=tl.int32)
    for start in range(0, N, BLOCK_N):
        idx = start + offs
        valid = idx < N
        key = _load_keys(row_ptr, idx, N, stride_n)
        eq = ((key == prefix) & valid).to(tl.int32)
        eq_rank = n_eq + tl.cumsum(eq, axis=0) - eq
        keep = (((key > prefix) & valid) | ((eq != 0) & (eq_rank < need_eq))).to(tl.int32)
        keep_pos = n_keep + tl.cumsum(keep, axis=0) - keep
        rest_pos = idx - keep_pos
        tl.store(keep_ptr + b * K + keep_pos, idx.to(tl.int64), mask=(keep != 0) & (keep_pos < K))
        tl.store(rest_ptr + b * (N - K) + rest_pos, idx.to(tl.int64),
                 mask=valid & (keep == 0) & (rest_pos < N - K))
        n_keep += tl.sum(keep, axis=0)
        n_eq += tl.sum(eq, axis=0)


def topk_select(scores, k: int):
    """(keep int64 [B, k], rest int64 [B, N - k]): the k best-scored indices and the others, ascending.

    scores: float [B, N] (fp32 / fp16 / bf16), any strides: read in place through its strides.
    One launch, grid (B,). Larger score first; NaN ranks below -inf; -0.0 ties +0.0; ties -> lower index.
    """
    B, N = scores.shape
    keep = torch.empty(B, k, dtype=torch.int64, device=scores.device)
    rest = torch.empty(B, N - k, dtype=torch.int64, device=scores.device)
    if B == 0 or N == 0:
        return keep, rest
    block_n = min(pow2(N), MAX_BLOCK_N)
    with on_device(scores):
        _topk_select_kernel[(B,)](scores, keep, rest, N, k, scores.stride(0), scores.stride(1),
                                  BLOCK_N=block_n, RADIX_BITS=RADIX_BITS,
                                  num_warps=8 if block_n >= 1024 else 4)
    return keep, rest
