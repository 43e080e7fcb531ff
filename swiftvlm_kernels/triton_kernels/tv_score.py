"""tv_score: head-mean of the last token's softmax attention at the visual keys (Eq. 1-2, last row).

Two launches, split over the key axis (split-K) and never materialising per-head probabilities:
  1. _split_stats_kernel, grid (B * Hkv, num_splits): one program takes the G = H / Hkv query heads
     of one KV head over one key range, so the G heads share every key load; it writes the running
     max and sum of exp of each head's logits over the valid keys of its range, and (KV head 0)
     the number of valid keys in the range.
  2. _visual_scores_kernel, grid (B, cdiv(vis_len, BLOCK_V)): one program takes a tile of visual
     keys and all H heads; it merges the split statistics into each head's softmax normaliser,
     recomputes the logits of its keys, and writes the head mean of the probabilities.
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

TILE_ELEMENTS = 4096  # fp32 products per [rows, keys, BLOCK_D] tile: 16 a thread at 8 warps, ~128 registers
NUM_WARPS = 8
MAX_SPLITS = 64
TARGET_PROGRAMS = 1024  # split the key axis until (B * Hkv * num_splits) reaches about this


@triton.jit
def _logits_base2(q_ptrs, q_mask, k_ptrs, k_mask, D, stride_qd, stride_kd, qk_scale,
                  BLOCK_D: tl.constexpr):
    """log2(e) * scale * <q, k> in fp32 for a [rows, keys] tile (Eq. 2).

    q_ptrs [rows, 1] and k_ptrs [rows or 1, keys] point at element d = 0 of each vector.
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
def _split_stats_kernel(q_ptr, k_ptr, mask_ptr, max_ptr, sum_ptr, cnt_ptr,
                        Hkv, L, D, G, split_len, num_splits, qk_scale,
                        stride_qb, stride_qh, stride_qd,
                        stride_kb, stride_kh, stride_kl, stride_kd,
                        stride_mb, stride_ml,
                        HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid // Hkv
    kv_head = pid % Hkv
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    q_ptrs = q_ptr + b * stride_qb + (kv_head * G + g)[:, None] * stride_qh
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh

    run_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    valid_keys = tl.zeros([BLOCK_L], dtype=tl.int32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, L)
    for l0 in range(lo, hi, BLOCK_L):
        keys = l0 + tl.arange(0, BLOCK_L)
        key_ok = keys < hi
        if HAS_MASK:
            key_ok = key_ok & tl.load(mask_ptr + b * stride_mb + keys * stride_ml, mask=key_ok, other=0) != 0
        logits = _logits_base2(q_ptrs, g_ok[:, None], k_base + keys[None, :] * stride_kl, key_ok[None, :],
                               D, stride_qd, stride_kd, qk_scale, BLOCK_D)
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
        valid_keys += key_ok.to(tl.int32)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no valid key yet: avoid -inf - -inf
        run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(logits - shift[:, None]), axis=1)
        run_max = new_max

    stat = (b * Hkv * G + kv_head * G + g) * num_splits + split
    tl.store(max_ptr + stat, run_max, mask=g_ok)
    tl.store(sum_ptr + stat, run_sum, mask=g_ok)
    tl.store(cnt_ptr + b * num_splits + split, tl.sum(valid_keys, axis=0), mask=kv_head == 0)


@triton.jit
def _visual_scores_kernel(q_ptr, k_ptr, mask_ptr, vis_ptr, max_ptr, sum_ptr, cnt_ptr, out_ptr,
                          H, L, D, G, vis_len, num_splits, qk_scale,
                          stride_qb, stride_qh, stride_qd,
                          stride_kb, stride_kh, stride_kl, stride_kd,
                          stride_mb, stride_ml, stride_vis,
                          HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    pos = tl.load(vis_ptr + b * stride_vis).to(tl.int64) + i
    in_seq = (i < vis_len) & (pos >= 0) & (pos < L)  # positions outside [0, L) score 0
    pos = tl.where(in_seq, pos, 0)
    key_ok = in_seq
    if HAS_MASK:
        key_ok = key_ok & tl.load(mask_ptr + b * stride_mb + pos * stride_ml, mask=in_seq, other=0) != 0

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

    q_ptrs = q_ptr + b * stride_qb + h[:, None] * stride_qh
    # query head h reads KV head h // G: the G heads of one KV head load the same addresses together
    k_ptrs = k_ptr + b * stride_kb + (h // G)[:, None] * stride_kh + pos[None, :] * stride_kl
    tile_ok = h_ok[:, None] & key_ok[None, :]
    logits = _logits_base2(q_ptrs, h_ok[:, None], k_ptrs, tile_ok, D, stride_qd, stride_kd, qk_scale, BLOCK_D)
    # Eq. 2 softmax; a masked key has probability 0 (0 * inv_sum: NaN in a NaN head, as torch.softmax)
    probs = tl.where(tile_ok, tl.exp2(logits - shift[:, None]) * inv_sum[:, None],
                     tl.where(h_ok[:, None] & in_seq[None, :], 0.0 * inv_sum[:, None], 0.0))
    tl.store(out_ptr + b * vis_len + i, tl.sum(probs, axis=0) / H, mask=i < vis_len)  # head mean


def _tile(rows, D, max_keys):
    """(BLOCK_D, BLOCK_keys) for a [rows, keys, BLOCK_D] fp32 product tile of about TILE_ELEMENTS."""
    block_d = min(pow2(D), 64)
    while rows * block_d > TILE_ELEMENTS // 4 and block_d > 16:
        block_d //= 2
    return block_d, max(1, min(max_keys, TILE_ELEMENTS // (rows * block_d)))


def tv_score(q, k, vis_start, vis_len: int, scale: float, key_mask=None):
    """fp32 [B, vis_len]: mean over heads of softmax_j(scale * <q_h, k_j>) at keys vis_start[b] + i.

    q [B, H, D], k [B, Hkv, L, D], vis_start int [B], key_mask bool [B, L] or None. All inputs are
    read in place through their strides (no copies); key_mask is reinterpreted as uint8 (a view).
    Two launches: grid (B * Hkv, num_splits), then grid (B, cdiv(vis_len, BLOCK_V)).
    """
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.empty(B, vis_len, dtype=torch.float32, device=q.device)
    if B == 0 or vis_len == 0:
        return out

    block_g = pow2(G)
    block_d, block_l = _tile(block_g, D, 64)
    tiles = triton.cdiv(L, block_l)  # split the keys into whole tiles, enough splits to fill the GPU
    num_splits = max(1, min(tiles, MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, B * Hkv)))
    split_len = triton.cdiv(tiles, num_splits) * block_l
    num_splits = max(1, triton.cdiv(L, split_len))
    split_max = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    split_sum = torch.empty_like(split_max)
    split_cnt = torch.empty(B, num_splits, dtype=torch.int32, device=q.device)

    has_mask = key_mask is not None
    mask = key_mask.view(torch.uint8) if has_mask else out  # placeholder pointer, never read
    mask_strides = (mask.stride(0), mask.stride(1)) if has_mask else (0, 0)
    qk_scale = float(scale) * math.log2(math.e)
    common = dict(HAS_MASK=has_mask, num_warps=NUM_WARPS)
    with on_device(q):
        _split_stats_kernel[(B * Hkv, num_splits)](
            q, k, mask, split_max, split_sum, split_cnt, Hkv, L, D, G, split_len, num_splits, qk_scale,
            *q.stride(), *k.stride(), *mask_strides,
            BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_D=block_d, **common)
        block_h = pow2(H)
        block_dv, block_v = _tile(block_h, D, 32)
        _visual_scores_kernel[(B, triton.cdiv(vis_len, block_v))](
            q, k, mask, vis_start, split_max, split_sum, split_cnt, out, H, L, D, G, vis_len, num_splits, qk_scale,
            *q.stride(), *k.stride(), *mask_strides, vis_start.stride(0),
            BLOCK_H=block_h, BLOCK_V=block_v, BLOCK_D=block_dv, BLOCK_S=pow2(num_splits), **common)
    return out
