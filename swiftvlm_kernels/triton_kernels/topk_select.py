"""topk_select: split 0..N-1 into the k best-scored indices and the rest, both in position order.

One launch, grid (B,), one program per row; no sort, no host synchronisation, any 0 <= k <= N.
Scores are compared through an order-preserving uint32 image (_sortable_key: -0.0 ties +0.0, NaN
below -inf); the k-th largest key T is found exactly, then keep = {key > T} plus the lowest-index
keys == T that are still needed (ties: lower index wins), and keep / rest are written in index order.

Rows of up to MAX_REGISTER_N scores (the benchmark rows: 576 to 16384) are read ONCE into registers:
  - T is bracketed in [lo, hi) by counting passes over the register-resident keys. Each pass counts
    the keys >= two thresholds in one reduction (both counts packed into one uint32): the linear
    interpolation of the bracket's counts (few passes on smooth score distributions) and the midpoint
    (the bracket at least halves: at most 32 passes on any input). When a pass stalls (the keys
    inside the bracket did not halve: ties, clusters), the next pass also reduces the nearest key on
    each side of both thresholds and snaps the bracket to key values, which ends on ties at once.
    A count equal to k ends the search early (no tie at the threshold).
  - One packed prefix sum (keys > T in the low 16 bits, keys == T in the high 16) gives every kept
    index its slot in keep and every other index its slot in rest; both are stored in one sweep.
    Rows longer than OUT_BLOCK make that sweep in blocks of OUT_BLOCK, re-reading their scores (an
    L2 hit): the addresses and int64 indices of a whole 16384-score row at once would spill.
  Warps: 16 keys a thread (512 scores a warp) from 4 warps up to 16 warps; 16384 scores: 32 a thread.
  Cost (MODEL, H100): one DRAM read of the row, ~4-9 counting passes on score rows (1-4 of them
  snapping), each a block-wide reduction of up to 32 keys a thread; ~12 us at N = 16384 (was ~53 us).
Longer rows (MAX_REGISTER_N < N) take the chunked path: an exact radix select over 4-bit digits
(8 counting passes re-reading the row in chunks of CHUNK), then one chunked pass writing keep and rest.
The row helpers (select_row, select_row_chunked) also serve score_select (tv_score.py), whose last
scoring program of a sample selects on the scores it has just merged.
"""
import torch
import triton
import triton.language as tl

from ._common import on_device, pow2

MAX_REGISTER_N = 16384  # rows up to this length are selected in registers (packed counts need N < 65536)
OUT_BLOCK = 4096  # longer register-resident rows write keep / rest in blocks of this, re-reading the scores
CHUNK = 1024  # chunk of the chunked path
RADIX_BITS = 4  # digit of the chunked path's radix select


def num_warps_for(block_n):
    """Warps of a program that holds a row of block_n keys in registers: 16 keys a thread from 4 warps
    up to 16 warps (4096 -> 8, 8192 and 16384 -> 16 warps: 32 keys a thread, 128 registers a thread)."""
    return max(4, min(16, block_n // 512))


@triton.jit
def _sortable_key(x):
    """uint32 image of fp32 x in the order of the scores: -0.0 ties +0.0, NaN (1) below -inf (0x007FFFFF).

    Every score maps to a key >= 1, so key 0 marks padding that no threshold >= 1 counts.
    """
    u = x.to(tl.uint32, bitcast=True)
    key = tl.where((u >> 31) != 0, u ^ 0xFFFFFFFF, u | 0x80000000)  # negatives: flip all bits; positives: set the sign
    key = tl.where(x == 0.0, 0x80000000, key)
    return tl.where(x != x, 1, key)


@triton.jit
def load_keys(row_ptr, idx, N, stride_n):
    """Keys of row[idx] (any float dtype, read in place through stride_n), 0 past N.

    Loads bypass L1 (.cg): score_select reads scores that other programs of its launch just wrote.
    """
    ok = idx < N
    x = tl.load(row_ptr + idx.to(tl.int64) * stride_n, mask=ok, other=0.0, cache_modifier=".cg")
    return tl.where(ok, _sortable_key(x.to(tl.float32)), 0)


@triton.jit
def _count_pass(key, t1, t2, SNAP: tl.constexpr):
    """(c1, c2, lo1, hi1, lo2, hi2) for thresholds t1, t2 >= 1 over the keys (0 = padding, never counted).

    c = #keys >= t. With SNAP, lo = the smallest key >= t and hi = the largest key < t, plus one, so
    #keys >= lo = #keys >= hi = c; without, lo = hi = t (the same counts, looser).
    """
    both = tl.sum((key >= t1).to(tl.uint32) + ((key >= t2).to(tl.uint32) << 16), axis=0)  # counts < 65536
    if SNAP:  # separate reductions: each keeps one value a thread live (a stacked one would keep four)
        lo1 = tl.min(tl.where(key >= t1, key, 0xFFFFFFFF), axis=0)
        hi1 = tl.max(tl.where(key >= t1, 0, key), axis=0) + 1
        lo2 = tl.min(tl.where(key >= t2, key, 0xFFFFFFFF), axis=0)
        hi2 = tl.max(tl.where(key >= t2, 0, key), axis=0) + 1
    else:
        lo1 = t1
        hi1 = t1
        lo2 = t2
        hi2 = t2
    return (both & 0xFFFF).to(tl.int32), (both >> 16).to(tl.int32), lo1, hi1, lo2, hi2


@triton.jit
def _tighten(t, c, t_lo, t_hi, K, lo, c_lo, hi, c_hi):
    """Narrow the bracket with #keys >= t = c (= #keys >= t_lo = #keys >= t_hi).

    Bracket: #keys >= lo = c_lo > K > c_hi = #keys >= hi; c_hi == K once a count equal to K is
    seen: then the keys >= hi are exactly the kept ones.
    """
    found = c_hi == K
    exact = (c == K) & ~found
    up = (c > K) & (t_lo > lo)
    down = (c < K) & (t_hi < hi) & ~found
    lo = tl.where(up, t_lo, lo)
    c_lo = tl.where(up, c, c_lo)
    hi = tl.where(exact, t, tl.where(down, t_hi, hi))
    c_hi = tl.where(exact, K, tl.where(down, c, c_hi))
    return lo, c_lo, hi, c_hi


@triton.jit
def _kth_largest(key, valid, N, K):
    """(lo, hi, c_hi) for the K-th largest of the valid keys (register-resident, 0 past N).

    Keys >= hi (c_hi of them, c_hi <= K) are kept; if c_hi < K then hi = lo + 1 and the K - c_hi
    lowest-index keys == lo are kept too.
    """
    lo = tl.min(tl.where(valid, key, 0xFFFFFFFF), axis=0)
    hi = tl.max(key, axis=0) + 1
    c_lo = N + 0 * K
    every = K == N  # keep all: no search
    hi = tl.where(every, lo, hi)
    c_hi = tl.where(every, K, 0)
    stalled = K < 0
    while (hi - lo > 1) & (c_hi != K):
        span = (hi - lo).to(tl.int64)
        guess = lo + (span * (c_lo - K) // (c_lo - c_hi)).to(tl.uint32)  # linear in the bracket's counts
        guess = tl.minimum(tl.maximum(guess, lo + 1), hi - 1)
        mid = lo + (hi - lo) // 2
        if stalled:
            c1, c2, lo1, hi1, lo2, hi2 = _count_pass(key, guess, mid, True)
        else:
            c1, c2, lo1, hi1, lo2, hi2 = _count_pass(key, guess, mid, False)
        inside = c_lo - c_hi
        lo, c_lo, hi, c_hi = _tighten(guess, c1, lo1, hi1, K, lo, c_lo, hi, c_hi)
        lo, c_lo, hi, c_hi = _tighten(mid, c2, lo2, hi2, K, lo, c_lo, hi, c_hi)
        stalled = (c_lo - c_hi) * 2 > inside
    return lo, hi, c_hi


@triton.jit
def _write_block(key, idx, valid, hi, eq_key, need_eq, n_above, n_equal, keep_row, rest_row):
    """Store one block of a row's indices: keys >= hi are kept, and keys == eq_key while fewer than
    need_eq of them were kept; n_above / n_equal count those keys at lower indices (earlier blocks).
    Returns the counts past this block. One packed prefix sum: (#above, #equal) in the low / high 16 bits."""
    above = key >= hi  # hi >= 1: padding (key 0) is never above
    equal = key == eq_key  # eq_key >= 1 is no padding
    flags = above.to(tl.uint32) + (equal.to(tl.uint32) << 16)
    before = tl.cumsum(flags, axis=0) - flags  # (#above, #equal) at lower indices of the block
    equal_before = n_equal + (before >> 16).to(tl.int32)
    keep = above | (equal & (equal_before < need_eq))
    keep_pos = n_above + (before & 0xFFFF).to(tl.int32) + tl.minimum(equal_before, need_eq)
    tl.store(keep_row + keep_pos, idx.to(tl.int64), mask=keep)
    tl.store(rest_row + (idx - keep_pos), idx.to(tl.int64), mask=valid & ~keep)
    total = tl.sum(flags, axis=0)
    return n_above + (total & 0xFFFF).to(tl.int32), n_equal + (total >> 16).to(tl.int32)


@triton.jit
def select_row(key, idx, N, K, keep_row, rest_row, row_ptr, stride_n, BLOCK_N: tl.constexpr,
                OUT_BLOCK: tl.constexpr):
    """Write keep_row[0:K] and rest_row[0:N-K] (int64 indices, ascending) for register-resident keys.

    Rows of up to OUT_BLOCK keys are written from the registers; longer ones re-read their scores
    (row_ptr, stride_n; an L2 hit) in blocks of OUT_BLOCK for the output sweep, which keeps the
    output's addresses and int64 values out of the registers that hold the row (no spills)."""
    valid = idx < N
    lo, hi, c_hi = _kth_largest(key, valid, N, K)
    need_eq = K - c_hi
    eq_key = tl.where(need_eq > 0, lo, 0xFFFFFFFF)  # no key is 0xFFFFFFFF
    zero = need_eq * 0
    if BLOCK_N <= OUT_BLOCK:
        _write_block(key, idx, valid, hi, eq_key, need_eq, zero, zero, keep_row, rest_row)
    else:
        n_above = zero
        n_equal = zero
        for start in range(0, N, OUT_BLOCK):
            j = start + tl.arange(0, OUT_BLOCK)
            n_above, n_equal = _write_block(load_keys(row_ptr, j, N, stride_n), j, j < N, hi, eq_key, need_eq,
                                            n_above, n_equal, keep_row, rest_row)


@triton.jit
def select_row_chunked(row_ptr, stride_n, N, K, keep_row, rest_row, BLOCK: tl.constexpr,
                        RADIX_BITS: tl.constexpr):
    """select_row for rows of any length: radix select over RADIX_BITS-bit digits, the row re-read in chunks."""
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.uint32)
    # Radix select of the K-th largest key T, high bits first. Invariant: T lies in
    # [prefix, prefix + (1 << (shift + RADIX_BITS))) and `above` keys lie past that bucket.
    prefix = tl.zeros([1], dtype=tl.uint32)
    above = tl.zeros([1], dtype=tl.int32)
    for p in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (p + 1)
        bounds = prefix | (digits << shift)
        at_least = tl.zeros([1 << RADIX_BITS], dtype=tl.int32)  # at_least[j] = #keys >= bounds[j]
        for start in range(0, N, BLOCK):
            idx = start + offs
            key = load_keys(row_ptr, idx, N, stride_n)
            at_least += tl.sum(((key[None, :] >= bounds[:, None]) & (idx < N)[None, :]).to(tl.int32), axis=1)
        # the largest digit whose bucket start still has >= K keys at or above it (K = 0 -> all ones)
        digit = tl.sum((at_least >= K).to(tl.int32), axis=0) - 1
        next_count = tl.sum(tl.where(digits.to(tl.int32) == digit + 1, at_least, 0), axis=0)
        above = tl.where(digit + 1 < (1 << RADIX_BITS), next_count, above)
        prefix = prefix | (digit.to(tl.uint32) << shift)

    # keys > T are kept; of the keys == T, the lowest-index K - above ones (ties: lower index wins)
    need_eq = K - above
    n_keep = tl.zeros([1], dtype=tl.int32)
    n_eq = tl.zeros([1], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + offs
        valid = idx < N
        key = load_keys(row_ptr, idx, N, stride_n)
        eq = ((key == prefix) & valid).to(tl.int32)
        eq_rank = n_eq + tl.cumsum(eq, axis=0) - eq
        keep = (((key > prefix) & valid) | ((eq != 0) & (eq_rank < need_eq))).to(tl.int32)
        keep_pos = n_keep + tl.cumsum(keep, axis=0) - keep
        tl.store(keep_row + keep_pos, idx.to(tl.int64), mask=keep != 0)
        tl.store(rest_row + (idx - keep_pos), idx.to(tl.int64), mask=valid & (keep == 0))
        n_keep += tl.sum(keep, axis=0)
        n_eq += tl.sum(eq, axis=0)


@triton.jit
def fill_minus_one(ptr, lo, hi, BLOCK: tl.constexpr):
    """ptr[lo:hi] = -1 (int64): the padding of a ragged row's index list."""
    for start in range(lo, hi, BLOCK):
        j = start + tl.arange(0, BLOCK)
        tl.store(ptr + j, tl.full([BLOCK], -1, tl.int64), mask=j < hi)


@triton.jit
def _ragged_counts(len_ptr, k_ptr, b, N, K, HAS_LENGTHS: tl.constexpr, K_TENSOR: tl.constexpr):
    """A ragged row's (scores, kept): lengths[b] (else N) and k[b] (else K), clamped into range."""
    n_b = N + 0 * b
    if HAS_LENGTHS:
        n_b = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int64), 0), N)
    k_b = K + 0 * b
    if K_TENSOR:
        k_b = tl.load(k_ptr + b).to(tl.int64)
    return n_b, tl.minimum(tl.maximum(k_b, 0), n_b)


@triton.jit
def _topk_select_kernel(scores_ptr, keep_ptr, rest_ptr, len_ptr, k_ptr, N, K, KW, RW, stride_b, stride_n,
                        BLOCK_N: tl.constexpr, IN_REGISTERS: tl.constexpr, OUT_BLOCK: tl.constexpr,
                        RADIX_BITS: tl.constexpr, RAGGED: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                        K_TENSOR: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = scores_ptr + b * stride_b
    keep_row = keep_ptr + b * KW  # KW = K, RW = N - K, unless ragged (KW = max_k, RW = N)
    rest_row = rest_ptr + b * RW
    n_b = N
    k_b = K
    if RAGGED:
        n_b, k_b = _ragged_counts(len_ptr, k_ptr, b, N, K, HAS_LENGTHS, K_TENSOR)
    if IN_REGISTERS:
        idx = tl.arange(0, BLOCK_N)
        select_row(load_keys(row, idx, n_b, stride_n), idx, n_b, k_b, keep_row, rest_row, row, stride_n, BLOCK_N,
                    OUT_BLOCK)
    else:
        select_row_chunked(row, stride_n, n_b, k_b, keep_row, rest_row, BLOCK_N, RADIX_BITS)
    if RAGGED:  # each index list ascending, then -1
        fill_minus_one(keep_row, k_b, KW, 1024)
        fill_minus_one(rest_row, n_b - k_b, RW, 1024)


def row_config(n):
    """(BLOCK_N, IN_REGISTERS, num_warps) of a program selecting on a row of n scores."""
    if n <= MAX_REGISTER_N:
        block_n = max(pow2(n), 128)
        return block_n, True, num_warps_for(block_n)
    return CHUNK, False, 8


def topk_select(scores, k, lengths=None, max_k=None):
    """(keep int64 [B, k], rest int64 [B, N - k]): the k best-scored indices and the others, ascending.

    scores: float [B, N] (fp32 / fp16 / bf16), any strides: read in place through its strides.
    One launch, grid (B,). Larger score first; NaN ranks below -inf; -0.0 ties +0.0; ties -> lower index.
    Ragged rows (k an int tensor [B] and / or lengths [B], the padded width max_k): each row selects
    among its own leading lengths[b] scores; keep [B, max_k] and rest [B, N], each ascending then -1.
    """
    B, N = scores.shape
    ragged = isinstance(k, torch.Tensor) or lengths is not None
    if ragged:
        KW = max_k if isinstance(k, torch.Tensor) else k
        K, RW = (0 if isinstance(k, torch.Tensor) else k), N
    else:
        K = KW = k
        RW = N - k
    keep = torch.empty(B, KW, dtype=torch.int64, device=scores.device)
    rest = torch.empty(B, RW, dtype=torch.int64, device=scores.device)
    if B == 0 or N == 0:
        return keep.fill_(-1) if ragged else keep, rest
    block_n, in_registers, num_warps = row_config(N)
    with on_device(scores):
        _topk_select_kernel[(B,)](scores, keep, rest, lengths.contiguous() if lengths is not None else keep,
                                  k.contiguous() if isinstance(k, torch.Tensor) else keep, N, K, KW, RW,
                                  scores.stride(0), scores.stride(1),
                                  BLOCK_N=block_n, IN_REGISTERS=in_registers, OUT_BLOCK=OUT_BLOCK,
                                  RADIX_BITS=RADIX_BITS, RAGGED=ragged, HAS_LENGTHS=lengths is not None,
                                  K_TENSOR=isinstance(k, torch.Tensor), num_warps=num_warps)
    return keep, rest
