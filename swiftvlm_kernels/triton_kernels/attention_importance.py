"""attention_importance: the attention each visual key receives from the text rows and from the visual
rows, averaged over heads and rows (ALVTS' importance; docs/semantics.md), flash-style: never
[B, H, L, L], O(L^2 E) work, O(B H L) scratch.

Three launches, deterministic (no atomics; every sum in a fixed order, so equal input gives bit-equal
output on every run):
  1. _row_stats_kernel, grid (B * Hk * head_groups, cdiv(L, BLOCK_M)): one program takes BLOCK_M rows of
     BLOCK_G query heads of one key head, stacked into one row tile of 64 (head, row) pairs, so the
     heads share every key tile load. It walks the key tiles up to its last row (causal) with a
     running max and sum of exp per row and writes each row's softmax statistics: the max logit m_j
     and 1 / sum_m exp(logit - m_j) (0 for a row before the sample's first valid key: it has no
     probabilities). It also writes a flag [B, Hk * head_groups, row tiles]: a row of it that has a
     valid key has a NaN softmax (a NaN or +inf logit, or -inf at every valid key), which in the
     reference makes every probability of the sample NaN.
  2. _visual_columns_kernel, grid (B * Hk * head_groups, cdiv(width, BLOCK_N)): one program takes a
     tile of BLOCK_N VISUAL keys (vis_start[b] + i: only the columns the outputs need) of one key head,
     loops over the row tiles from its first key on (causal) and sums the probabilities
     exp(logit - m_j) / sum_j of every valid row j over its stacked heads and rows, split into text
     rows and visual rows: per-(sample, head group, key) partial sums [B, Hk * head_groups, 2, width].
  3. _importance_means_kernel, grid (B, cdiv(width, BLOCK_R)): adds the partial sums over the head
     groups in order, counts the sample's valid text and visual rows from key_mask, and writes the
     means (sum / (H * count), IEEE division), 0 without such rows, NaN for a flagged sample, 0 past a
     ragged sample's own count and at positions outside [0, L).
The dot products are tiles of tl.dot over E in chunks of BLOCK_E features (any E), in fp32 with IEEE
products (fp16 / bf16 loads converted to fp32 first: exact, and fp32 math for every input dtype); the
logits are scale * <q, k> as the reference rounds them and exp(x) is exp2(x * log2(e)) of x = logit - m
(never of a large logit: a stored log-sum-exp would lose the low bits of large logits). Block sizes
depend only on G = H / Hk and E (never on the batch, L or the width), so a sample of a ragged batch
gets the same sums in the same order as alone: bit-equal.
Parallelism: launches 1 and 2 run B * Hk * head_groups programs per row (key) tile, enough for the
layer's heads (LLaVA-1.5, 32 heads: 352 and 288 programs) but not for the selector's one head at batch
1 (11 and 9): splitting launch 1's keys and launch 2's rows over more programs would fill the GPU there.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import on_device, pow2

STACK = 64  # (head, row) pairs of a row tile: BLOCK_G heads x BLOCK_M rows
MAX_BLOCK_G = 16  # query heads stacked per program; more heads per key head: more programs
BLOCK_N = 64  # keys per tile
BLOCK_E = 32  # features per tl.dot (at least 16, tl.dot's smallest dimension)
BLOCK_R = 256  # outputs per program of launch 3
# The dot tiles' launch: 8 warps, no software pipelining of the feature loop (its buffers spill), and
# the register limit stated: ptxas left to itself caps some variants at 128 registers and spills; with
# it they use at most 190 registers (sm_80 / sm_90a; 234 under triton 3.6) and spill nothing.
NUM_WARPS = 8
NUM_STAGES = 1
MAX_REGISTERS = 255
LOG2E = tl.constexpr(math.log2(math.e))


@triton.jit
def _logits(q_rows, row_ok, k_rows, key_ok, E, stride_qe, stride_ke, scale,
            ROWS: tl.constexpr, KEYS: tl.constexpr, BLOCK_E: tl.constexpr):
    """scale * <q_j, k_m>, fp32 [ROWS, KEYS]; q_rows [ROWS] and k_rows [KEYS] point at feature 0 of
    each vector. Masked rows and keys load zeros."""
    ee = tl.arange(0, BLOCK_E)
    acc = tl.zeros([ROWS, KEYS], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + ee
        e_ok = e < E
        qv = tl.load(q_rows[:, None] + e[None, :] * stride_qe, mask=row_ok[:, None] & e_ok[None, :],
                     other=0.0).to(tl.float32)
        kv = tl.load(k_rows[None, :] + e[:, None] * stride_ke, mask=e_ok[:, None] & key_ok[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(qv, kv, acc, input_precision="ieee")
    return acc * scale


@triton.jit
def _valid(mask_ptr, b, pos, ok, stride_mb, stride_ml, HAS_MASK: tl.constexpr):
    """ok & key_mask[b, pos] (positions outside ok are not read)."""
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + b * stride_mb + pos * stride_ml, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _row_stats_kernel(q_ptr, k_ptr, mask_ptr, max_ptr, inv_ptr, flag_ptr, Hk, G, L, E, head_groups, scale,
                      stride_qb, stride_qh, stride_ql, stride_qe, stride_kb, stride_kh, stride_kl, stride_ke,
                      stride_mb, stride_ml,
                      HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_E: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # (sample, key head, head group)
    tile = tl.program_id(1)
    b = pid // (Hk * head_groups)
    kv = (pid // head_groups) % Hk
    s = tl.arange(0, BLOCK_G * BLOCK_M)
    g = (pid % head_groups) * BLOCK_G + s // BLOCK_M
    rows = tile * BLOCK_M + s % BLOCK_M
    row_ok = (g < G) & (rows < L)  # every row: a padding row's NaN softmax counts too
    head = kv * G + g
    q_rows = q_ptr + b * stride_qb + head * stride_qh + rows * stride_ql
    k_head = k_ptr + b * stride_kb + kv * stride_kh

    run_max = tl.full([BLOCK_G * BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_G * BLOCK_M], dtype=tl.float32)
    has_key = tl.zeros([BLOCK_G * BLOCK_M], dtype=tl.int32)
    for n0 in range(0, tl.minimum((tile + 1) * BLOCK_M, L), BLOCK_N):  # keys up to the tile's last row
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = _valid(mask_ptr, b, keys, keys < L, stride_mb, stride_ml, HAS_MASK)
        logits = _logits(q_rows, row_ok, k_head + keys * stride_kl, key_ok, E, stride_qe, stride_ke, scale,
                         BLOCK_G * BLOCK_M, BLOCK_N, BLOCK_E)
        allowed = key_ok[None, :] & (keys[None, :] <= rows[:, None])  # causal, valid keys
        logits = tl.where(allowed, logits, float("-inf"))
        has_key = tl.maximum(has_key, tl.max(allowed.to(tl.int32), axis=1))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no finite logit yet: avoid -inf - -inf
        run_sum = run_sum * tl.exp2((run_max - shift) * LOG2E) + \
            tl.sum(tl.exp2((logits - shift[:, None]) * LOG2E), axis=1)
        run_max = new_max
    # -inf at every valid key (sum 0) or a NaN / +inf logit (sum NaN): torch.softmax's NaN row
    inv_sum = tl.math.div_rn(tl.zeros_like(run_sum) + 1.0, tl.where(run_sum == 0.0, 1.0, run_sum))
    inv_sum = tl.where(run_sum == 0.0, float("nan"), inv_sum)
    inv_sum = tl.where(has_key > 0, inv_sum, 0.0)  # a row before the first valid key: no probabilities
    at = (b * Hk * G + head) * L + rows
    tl.store(max_ptr + at, tl.where(has_key > 0, run_max, 0.0), mask=row_ok)
    tl.store(inv_ptr + at, inv_sum, mask=row_ok)
    bad = row_ok & (inv_sum != inv_sum)
    tl.store(flag_ptr + pid * tl.num_programs(1) + tile, tl.max(bad.to(tl.int32), axis=0))


@triton.jit
def _sample_span(vis_ptr, cnt_ptr, b, W, stride_vis, RAGGED: tl.constexpr):
    """(vis_start[b], the sample's visual count clamped into [0, W])."""
    vs = tl.load(vis_ptr + b * stride_vis).to(tl.int64)
    n_b = W + 0 * b
    if RAGGED:
        n_b = tl.minimum(tl.maximum(tl.load(cnt_ptr + b).to(tl.int64), 0), W)
    return vs, n_b


@triton.jit
def _visual_columns_kernel(q_ptr, k_ptr, mask_ptr, vis_ptr, cnt_ptr, max_ptr, inv_ptr, part_ptr, Hk, G, L, E, W,
                           head_groups, scale, stride_qb, stride_qh, stride_ql, stride_qe, stride_kb, stride_kh,
                           stride_kl, stride_ke, stride_mb, stride_ml, stride_vis,
                           HAS_MASK: tl.constexpr, RAGGED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # (sample, key head, head group)
    i0 = tl.program_id(1) * BLOCK_N
    b = pid // (Hk * head_groups)
    kv = (pid // head_groups) % Hk
    vs, n_b = _sample_span(vis_ptr, cnt_ptr, b, W, stride_vis, RAGGED)
    i = i0 + tl.arange(0, BLOCK_N)
    keys = vs + i
    key_ok = _valid(mask_ptr, b, keys, (i < n_b) & (keys >= 0) & (keys < L), stride_mb, stride_ml, HAS_MASK)
    k_rows = k_ptr + b * stride_kb + kv * stride_kh + keys * stride_kl

    s = tl.arange(0, BLOCK_G * BLOCK_M)
    g = (pid % head_groups) * BLOCK_G + s // BLOCK_M
    head = kv * G + g
    q_head = q_ptr + b * stride_qb + head * stride_qh
    stats = (b * Hk * G + head) * L
    text_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    visual_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = tl.maximum(vs + i0, 0)  # the tile's first key: no row before it sees any of its keys
    lo = tl.where(i0 < n_b, first // BLOCK_M * BLOCK_M, L)  # (a tile past the sample's count: no rows)
    for j0 in range(lo, L, BLOCK_M):
        rows = j0 + s % BLOCK_M
        row_ok = _valid(mask_ptr, b, rows, (g < G) & (rows < L), stride_mb, stride_ml, HAS_MASK)  # valid rows
        row_max = tl.load(max_ptr + stats + rows, mask=row_ok, other=0.0)
        inv_sum = tl.load(inv_ptr + stats + rows, mask=row_ok, other=0.0)
        logits = _logits(q_head + rows * stride_ql, row_ok, k_rows, key_ok, E, stride_qe, stride_ke, scale,
                         BLOCK_G * BLOCK_M, BLOCK_N, BLOCK_E)
        allowed = row_ok[:, None] & key_ok[None, :] & (keys[None, :] <= rows[:, None])
        p = tl.exp2(tl.where(allowed, (logits - row_max[:, None]) * LOG2E, float("-inf")))
        p = tl.where(allowed, p * inv_sum[:, None], 0.0)  # the row's softmax probability
        visual = (rows >= vs) & (rows < vs + n_b)
        text_sum += tl.sum(tl.where(visual[:, None], 0.0, p), axis=0)
        visual_sum += tl.sum(tl.where(visual[:, None], p, 0.0), axis=0)
    out = part_ptr + pid * 2 * W + i
    tl.store(out, text_sum, mask=i < W)
    tl.store(out + W, visual_sum, mask=i < W)


@triton.jit
def _importance_means_kernel(mask_ptr, vis_ptr, cnt_ptr, flag_ptr, part_ptr, t2v_ptr, v2v_ptr, H, L, W, parts,
                             row_tiles, stride_mb, stride_ml, stride_vis,
                             HAS_MASK: tl.constexpr, RAGGED: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    vs, n_b = _sample_span(vis_ptr, cnt_ptr, b, W, stride_vis, RAGGED)
    r = tl.arange(0, BLOCK_R)
    text_rows = tl.zeros([BLOCK_R], dtype=tl.int32)
    visual_rows = tl.zeros([BLOCK_R], dtype=tl.int32)
    for r0 in range(0, L, BLOCK_R):  # the sample's valid text and visual rows
        rows = r0 + r
        ok = _valid(mask_ptr, b, rows, rows < L, stride_mb, stride_ml, HAS_MASK)
        visual = (rows >= vs) & (rows < vs + n_b)
        text_rows += (ok & ~visual).to(tl.int32)
        visual_rows += (ok & visual).to(tl.int32)
    n_text = tl.sum(text_rows, axis=0)
    n_visual = tl.sum(visual_rows, axis=0)
    flags = tl.zeros([BLOCK_R], dtype=tl.int32)
    for f0 in range(0, parts * row_tiles, BLOCK_R):  # a NaN softmax row anywhere in the sample
        f = f0 + r
        flags = tl.maximum(flags, tl.load(flag_ptr + b * parts * row_tiles + f, mask=f < parts * row_tiles, other=0))
    bad = tl.max(flags, axis=0) > 0

    text_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    visual_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for p in range(0, parts):  # head groups in order
        at = part_ptr + (b * parts + p) * 2 * W + i
        text_sum += tl.load(at, mask=i < W, other=0.0)
        visual_sum += tl.load(at + W, mask=i < W, other=0.0)
    pos = vs + i
    inside = (i < n_b) & (pos >= 0) & (pos < L)
    heads = tl.zeros([BLOCK_R], dtype=tl.float32) + H
    t2v = tl.math.div_rn(text_sum, heads * tl.maximum(n_text, 1).to(tl.float32))
    v2v = tl.math.div_rn(visual_sum, heads * tl.maximum(n_visual, 1).to(tl.float32))
    t2v = tl.where(inside & (n_text > 0), tl.where(bad, float("nan"), t2v), 0.0)
    v2v = tl.where(inside & (n_visual > 0), tl.where(bad, float("nan"), v2v), 0.0)
    tl.store(t2v_ptr + b * W + i, t2v, mask=i < W)
    tl.store(v2v_ptr + b * W + i, v2v, mask=i < W)


def _blocks(G):
    """(BLOCK_G, BLOCK_M, head groups): BLOCK_G heads x BLOCK_M rows stacked into STACK rows."""
    block_g = min(pow2(G), MAX_BLOCK_G)
    return block_g, STACK // block_g, triton.cdiv(G, block_g)


def attention_importance(q, k, vis_start, vis_len, scale: float, key_mask=None, max_vis_len=None):
    """(t2v, v2v) fp32 [B, vis_len] each (ragged: vis_len an int tensor [B] of per-sample counts, read
    on the device, and results [B, max_vis_len], 0 past vis_len[b]).

    q [B, H, L, E], k [B, Hk, L, E] (any strides, read in place), vis_start int [B], key_mask bool
    [B, L] or None (reinterpreted as uint8, a view). Three launches (the module docstring); scratch:
    the rows' max and 1 / sum fp32 [B, H, L] each, partial sums fp32 [B, Hk * head_groups, 2, width],
    flags int32 [B, Hk * head_groups, cdiv(L, BLOCK_M)].
    """
    B, H, L, E = q.shape
    Hk = k.shape[1]
    G = H // Hk
    ragged = isinstance(vis_len, torch.Tensor)
    counts = vis_len.contiguous() if ragged else vis_start  # (not ragged: a placeholder, never read)
    W = int(max_vis_len) if ragged else int(vis_len)
    t2v = torch.empty(B, W, dtype=torch.float32, device=q.device)
    v2v = torch.empty(B, W, dtype=torch.float32, device=q.device)
    if B == 0 or W == 0:
        return t2v, v2v
    block_g, block_m, head_groups = _blocks(G)
    parts = Hk * head_groups
    row_tiles = triton.cdiv(L, block_m)
    row_max = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    inv_sum = torch.empty_like(row_max)
    flags = torch.empty(B, parts, row_tiles, dtype=torch.int32, device=q.device)
    partial = torch.empty(B, parts, 2, W, dtype=torch.float32, device=q.device)
    has_mask = key_mask is not None
    mask = key_mask.view(torch.uint8) if has_mask else row_max  # placeholder pointer, never read
    mask_strides = (mask.stride(0), mask.stride(1)) if has_mask else (0, 0)
    strides = (*q.stride(), *k.stride(), *mask_strides)
    blocks = dict(BLOCK_G=block_g, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_E=max(16, min(pow2(E), BLOCK_E)))
    with on_device(q):
        _row_stats_kernel[(B * parts, row_tiles)](
            q, k, mask, row_max, inv_sum, flags, Hk, G, L, E, head_groups, float(scale), *strides,
            HAS_MASK=has_mask, **blocks, num_warps=NUM_WARPS, num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS)
        _visual_columns_kernel[(B * parts, triton.cdiv(W, BLOCK_N))](
            q, k, mask, vis_start, counts, row_max, inv_sum, partial, Hk, G, L, E, W, head_groups, float(scale),
            *strides, vis_start.stride(0),
            HAS_MASK=has_mask, RAGGED=ragged, **blocks, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            maxnreg=MAX_REGISTERS)
        _importance_means_kernel[(B, triton.cdiv(W, BLOCK_R))](
            mask, vis_start, counts, flags, partial, t2v, v2v, H, L, W, parts, row_tiles, *mask_strides,
            vis_start.stride(0),
            HAS_MASK=has_mask, RAGGED=ragged, BLOCK_R=BLOCK_R, num_warps=4)
    return t2v, v2v
