"""tv_score: head-mean of the last token's softmax attention at the visual keys (Eq. 1-2, last row).

Two launches, split over the key axis (split-K); K is read once and no per-head probability is
materialised:
  1. _split_stats_kernel, grid (B * Hkv, num_splits): one program takes the G = H / Hkv query heads
     of one KV head over one key range, so the G heads share every key load (one [BLOCK_L, D] key
     tile an iteration, D whole). It writes the running max and sum of exp of each head's logits over
     the valid keys of its range, (KV head 0) the number of valid keys in the range, and the logits
     of the visual keys in its range to an fp32 workspace [B, H, vis_len] (-inf at masked keys), so
     launch 2 reads 4 bytes a head and visual key instead of the key's D elements again.
  2. _visual_scores_kernel, grid (B, cdiv(vis_len, BLOCK_V)): one program takes a tile of visual
     keys and all H heads; it merges the split statistics into each head's softmax normaliser, reads
     its keys' logits from the workspace and writes the head mean of the probabilities. All its loads
     are independent of one another (one round trip). For score_select (SELECT) the program then
     counts itself done on a per-sample counter (acq_rel atomic; launch 1 zeroes it, so CUDA-graph
     replays need no memset); the last program of a sample reads the sample's whole score row back
     and selects on it (topk_select.py's row helpers): no third launch.
Bytes: K once, plus 8 * H * vis_len bytes of workspace logits (written and read) and the split
statistics: ~3% over the minimum for H = Hkv, D = 128; for GQA the workspace holds G logits a visual
key against one key row of 2 * D bytes (Qwen2-VL, G = 7: ~21%), still less than re-reading K.
MODEL (H100, B = 1): LLaVA-NeXT ~13.5 us (was ~21 us re-reading K), video-16k ~52 us (was ~95 us).
Logits are kept in base 2 (the dot products times scale * log2(e)) so the kernels use exp2.
fp32 accumulation for fp32 / fp16 / bf16 input. Special values follow torch.softmax: a NaN or +inf
logit, or valid keys whose logits are all -inf, make the head's probabilities NaN; a sample without a
valid key scores 0 (the valid-key count tells the two apart).
"""
import math

import torch
import triton
import triton.language as tl

from ._common import on_device, pow2
from . import topk_select as _topk
from .topk_select import RADIX_BITS, fill_minus_one, load_keys, select_row, select_row_chunked, row_config

TILE_ELEMENTS = 4096  # fp32 products per [BLOCK_G, BLOCK_L, BLOCK_D] tile: 16 a thread at 8 warps (8192 spills on sm_80)
MIN_BLOCK_L = 16
MAX_BLOCK_D = 128  # the head dim is loaded whole up to this (D = 128 in the models), else in chunks
NUM_WARPS = 8
MAX_SPLITS = 64
TARGET_PROGRAMS = 1024  # split the key axis until (Hkv * num_splits) reaches about this (batches add more)
SCORE_TILE = 16  # launch 2: fp32 logits a thread in a [BLOCK_H, BLOCK_V] tile (32 spill with SELECT)


@triton.jit
def _logits_base2(q_ptrs, q_mask, k_ptrs, k_mask, D, stride_qd, stride_kd, qk_scale,
                  BLOCK_D: tl.constexpr):
    """log2(e) * scale * <q, k> in fp32 for a [rows, keys] tile (Eq. 2).

    q_ptrs [rows, 1] and k_ptrs [1, keys] point at element d = 0 of each vector.
    """
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((q_mask & k_mask).shape, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_ok = d < D
        qv = tl.load(q_ptrs[:, :, None] + d[None, None, :] * stride_qd,
                     mask=q_mask[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        kv = tl.load(k_ptrs[:, :, None] + d[None, None, :] * stride_kd,
                     mask=k_mask[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(qv * kv, axis=2)
    return acc * qk_scale


@triton.jit
def _split_stats_kernel(q_ptr, k_ptr, mask_ptr, vis_ptr, max_ptr, sum_ptr, cnt_ptr, logit_ptr, done_ptr,
                        Hkv, L, D, G, V, split_len, num_splits, qk_scale,
                        stride_qb, stride_qh, stride_qd,
                        stride_kb, stride_kh, stride_kl, stride_kd,
                        stride_mb, stride_ml, stride_vis,
                        HAS_MASK: tl.constexpr, RESET_DONE: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid // Hkv
    kv_head = pid % Hkv
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    q_ptrs = q_ptr + b * stride_qb + (kv_head * G + g)[:, None] * stride_qh
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    vis_start = tl.load(vis_ptr + b * stride_vis).to(tl.int64)
    logit_rows = logit_ptr + (b * Hkv * G + kv_head * G + g)[:, None] * V  # workspace [B, H, V]

    run_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    valid_keys = tl.zeros([BLOCK_L], dtype=tl.int32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, L)
    for l0 in range(lo, hi, BLOCK_L):
        keys = l0 + tl.arange(0, BLOCK_L)
        in_range = keys < hi
        key_ok = in_range
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_ptr + b * stride_mb + keys * stride_ml, mask=in_range, other=0) != 0)
        logits = _logits_base2(q_ptrs, g_ok[:, None], k_base + keys[None, :] * stride_kl, key_ok[None, :],
                               D, stride_qd, stride_kd, qk_scale, BLOCK_D)
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
        # the visual keys' logits, -inf where masked: launch 2 needs nothing else of them
        i = keys - vis_start
        tl.store(logit_rows + i[None, :], logits, mask=g_ok[:, None] & (in_range & (i >= 0) & (i < V))[None, :])
        valid_keys += key_ok.to(tl.int32)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no valid key yet: avoid -inf - -inf
        run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(logits - shift[:, None]), axis=1)
        run_max = new_max

    stat = (b * Hkv * G + kv_head * G + g) * num_splits + split
    tl.store(max_ptr + stat, run_max, mask=g_ok)
    tl.store(sum_ptr + stat, run_sum, mask=g_ok)
    tl.store(cnt_ptr + b * num_splits + split, tl.sum(valid_keys, axis=0), mask=kv_head == 0)
    if RESET_DONE:  # launch 2's per-sample counter of finished programs starts at zero
        tl.store(done_ptr + b, 0, mask=(kv_head == 0) & (split == 0))


@triton.jit
def _visual_scores_kernel(vis_ptr, max_ptr, sum_ptr, cnt_ptr, logit_ptr, out_ptr, done_ptr, keep_ptr, rest_ptr,
                          vlen_ptr, kcnt_ptr, H, L, V, K, KW, RW, num_splits, stride_vis,
                          BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
                          SELECT: tl.constexpr, BLOCK_N: tl.constexpr, IN_REGISTERS: tl.constexpr, OUT_BLOCK: tl.constexpr,
                          RADIX_BITS: tl.constexpr, RAGGED: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    pos = tl.load(vis_ptr + b * stride_vis).to(tl.int64) + i
    v_b = V + 0 * b  # a ragged sample's own visual count (scores 0 past it, as past L)
    if RAGGED:
        v_b = tl.minimum(tl.maximum(tl.load(vlen_ptr + b).to(tl.int64), 0), V)
    in_seq = (i < v_b) & (pos >= 0) & (pos < L)  # positions outside [0, L) score 0

    # Each head's softmax normaliser over all valid keys, from the per-split statistics.
    h = tl.arange(0, BLOCK_H)
    h_ok = h < H
    s = tl.arange(0, BLOCK_S)
    stat = (b * H + h)[:, None] * num_splits + s[None, :]
    stat_ok = h_ok[:, None] & (s < num_splits)[None, :]
    split_max = tl.load(max_ptr + stat, mask=stat_ok, other=float("-inf"))
    head_max = tl.max(split_max, axis=1)
    shift = tl.where(head_max == float("-inf"), 0.0, head_max)
    head_sum = tl.sum(tl.load(sum_ptr + stat, mask=stat_ok, other=0.0) * tl.exp2(split_max - shift[:, None]),
                      axis=1)
    # a sample without a valid key scores 0; valid keys whose logits are all -inf give NaN (as
    # torch.softmax); a NaN sum (NaN or +inf logits) stays NaN
    any_valid = tl.sum(tl.load(cnt_ptr + b * num_splits + s, mask=s < num_splits, other=0), axis=0) > 0
    inv_sum = tl.where(head_sum == 0.0, tl.where(any_valid, float("nan"), 0.0), 1.0 / head_sum)

    # Eq. 2 softmax at the visual keys. A masked key has logit -inf: probability 0 * inv_sum (NaN in a
    # NaN head, as torch.softmax). Entries outside [0, L) were never written: loaded, then discarded.
    tile_ok = h_ok[:, None] & (i < V)[None, :]
    logits = tl.load(logit_ptr + (b * H + h)[:, None] * V + i[None, :], mask=tile_ok, other=float("-inf"))
    probs = tl.where(h_ok[:, None] & in_seq[None, :], tl.exp2(logits - shift[:, None]) * inv_sum[:, None], 0.0)
    row = out_ptr + b * V
    tl.store(row + i, tl.sum(probs, axis=0) / H, mask=i < V)  # head mean (Eq. 1)

    if SELECT:
        # every program's scores are written before it counts itself done (release); the last one to
        # count (acquire) reads the sample's whole row back, past L1, and selects on it
        tl.debug_barrier()
        done = tl.atomic_add(done_ptr + b, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(1) - 1:
            keep_row = keep_ptr + b * KW  # KW = K, RW = V - K, unless ragged (KW = max_keep, RW = V)
            rest_row = rest_ptr + b * RW
            k_b = K + 0 * b
            if RAGGED:
                k_b = tl.minimum(tl.maximum(tl.load(kcnt_ptr + b).to(tl.int64), 0), v_b)
            if IN_REGISTERS:
                idx = tl.arange(0, BLOCK_N)
                select_row(load_keys(row, idx, v_b, 1), idx, v_b, k_b, keep_row, rest_row, row, 1, BLOCK_N,
                            OUT_BLOCK)
            else:
                select_row_chunked(row, 1, v_b, k_b, keep_row, rest_row, BLOCK_N, RADIX_BITS)
            if RAGGED:  # each index list ascending, then -1
                fill_minus_one(keep_row, k_b, KW, 1024)
                fill_minus_one(rest_row, v_b - k_b, RW, 1024)


def _stats_tile(rows, D):
    """(BLOCK_D, BLOCK_L) of launch 1: D whole up to MAX_BLOCK_D, keys to fill TILE_ELEMENTS products,
    at least MIN_BLOCK_L keys (GQA groups of 8 heads at D = 128: 16384 products; 4 or 8 keys a tile
    spill a few bytes under triton 3.9 or 3.6, 16 do not)."""
    block_d = min(pow2(D), MAX_BLOCK_D)
    return block_d, max(MIN_BLOCK_L, min(64, TILE_ELEMENTS // (rows * block_d)))


def visual_scores(q, k, vis_start, vis_len, scale: float, key_mask=None, keep=None, max_vis_len=None,
                  max_keep=None):
    """tv_score's scores fp32 [B, vis_len]; with keep (score_select), also (keep_idx, rest_idx).

    Ragged samples: vis_len (and keep) int tensors [B] with the padded widths max_vis_len (max_keep):
    scores [B, max_vis_len] 0 past vis_len[b], keep_idx [B, max_keep] and rest_idx [B, max_vis_len]
    each sample's indices ascending, then -1.
    Two launches: grid (B * Hkv, num_splits), then grid (B, cdiv(vis_len, BLOCK_V)).
    """
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    ragged = isinstance(vis_len, torch.Tensor)
    vlen = vis_len.contiguous() if ragged else None
    kcnt = keep.contiguous() if isinstance(keep, torch.Tensor) else None
    if ragged:
        vis_len = max_vis_len
    select = keep is not None
    if select:
        if ragged:
            K, KW, RW = 0, max_keep if kcnt is not None else keep, vis_len
            if kcnt is None:
                kcnt = torch.full((B,), keep, dtype=torch.int64, device=q.device)
        else:
            K, KW, RW = keep, keep, vis_len - keep
    out = torch.empty(B, vis_len, dtype=torch.float32, device=q.device)
    if select:
        keep_idx = torch.empty(B, KW, dtype=torch.int64, device=q.device)
        rest_idx = torch.empty(B, RW, dtype=torch.int64, device=q.device)
    if B == 0 or vis_len == 0:
        if ragged and select:
            keep_idx.fill_(-1)
        return (keep_idx, rest_idx, out) if select else out

    block_g = pow2(G)
    block_d, block_l = _stats_tile(block_g, D)
    tiles = triton.cdiv(L, block_l)  # split the keys into whole tiles, enough splits to fill the GPU
    # the split-K partition and the score tiles depend on neither the batch nor vis_len, so a sample's
    # scores do not depend on the rest of a (ragged) batch: the same sums in the same order
    num_splits = max(1, min(tiles, MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, Hkv)))
    split_len = triton.cdiv(tiles, num_splits) * block_l
    num_splits = max(1, triton.cdiv(L, split_len))
    split_max = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    split_sum = torch.empty_like(split_max)
    split_cnt = torch.empty(B, num_splits, dtype=torch.int32, device=q.device)
    logits = torch.empty(B, H, vis_len, dtype=torch.float32, device=q.device)
    done = torch.empty(B, dtype=torch.int32, device=q.device) if select else out  # out: placeholder, never used

    has_mask = key_mask is not None
    mask = key_mask.view(torch.uint8) if has_mask else out  # placeholder pointer, never read
    mask_strides = (mask.stride(0), mask.stride(1)) if has_mask else (0, 0)
    qk_scale = float(scale) * math.log2(math.e)
    block_n, in_registers, warps = row_config(vis_len) if select else (1, True, 4)
    block_h = pow2(H)
    block_v = max(1, SCORE_TILE * 32 * 4 // block_h)
    with on_device(q):
        _split_stats_kernel[(B * Hkv, num_splits)](
            q, k, mask, vis_start, split_max, split_sum, split_cnt, logits, done,
            Hkv, L, D, G, vis_len, split_len, num_splits, qk_scale,
            *q.stride(), *k.stride(), *mask_strides, vis_start.stride(0),
            HAS_MASK=has_mask, RESET_DONE=select, BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_D=block_d,
            num_warps=NUM_WARPS)
        _visual_scores_kernel[(B, triton.cdiv(vis_len, block_v))](
            vis_start, split_max, split_sum, split_cnt, logits, out, done,
            keep_idx if select else out, rest_idx if select else out,
            vlen if ragged else out, kcnt if ragged and select else out,
            H, L, vis_len, K if select else 0, KW if select else 0, RW if select else 0, num_splits,
            vis_start.stride(0),
            BLOCK_H=block_h, BLOCK_V=block_v, BLOCK_S=pow2(num_splits), SELECT=select, BLOCK_N=block_n,
            IN_REGISTERS=in_registers, OUT_BLOCK=_topk.OUT_BLOCK, RADIX_BITS=RADIX_BITS, RAGGED=ragged,
            num_warps=warps)
    return (keep_idx, rest_idx, out) if select else out


def tv_score(q, k, vis_start, vis_len, scale: float, key_mask=None, max_vis_len=None):
    """fp32 [B, vis_len]: mean over heads of softmax_j(scale * <q_h, k_j>) at keys vis_start[b] + i.

    q [B, H, D], k [B, Hkv, L, D], vis_start int [B], key_mask bool [B, L] or None. All inputs are
    read in place through their strides (no copies); key_mask is reinterpreted as uint8 (a view).
    Two launches: grid (B * Hkv, num_splits), then grid (B, cdiv(vis_len, BLOCK_V)).
    """
    return visual_scores(q, k, vis_start, vis_len, scale, key_mask, max_vis_len=max_vis_len)
