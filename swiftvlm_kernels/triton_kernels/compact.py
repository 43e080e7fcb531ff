"""compact: rebuild a sequence after a pruning stage in one launch (python_ref/compact.py has the
contract).

Grid (B, cdiv(n, BLOCK_R)): one program moves BLOCK_R of sample b's n rows, numbered
  [0, n - M)         the text rows, before and after the visual block (shifted by M' - M after it),
  [n - M, n - R)     the kept tokens: kept #q at slot s lands at block position q + ceil((s - q) Z / R)
                     (s - q rest tokens precede it, and the targets among them are the z with
                     floor(z R / Z) < s - q),
  [n - R, n)         the rest tokens: each is copied to rest_h; the group target z (rest #floor(z R / Z))
                     at slot s also lands at block position z + (s - floor(z R / Z)).
No search, no sort: every destination is arithmetic on the row's own slot. Rows are copied in
BLOCK_D column tiles; the index outputs are written with the first tile.

Ragged batches (compact.ragged: num_merged an int tensor [B], keep_idx [B, K] and rest_idx [B, M]
padded with -1): the same arithmetic with each sample's own k_b, r_b (its valid entries, counted by
every program in BLOCK-wide loads of its index rows: they are a prefix) and Z_b, over n + K + Zw
items: text rows; kept entries (an invalid one, q >= k_b, writes the zero padding row Z_b + q of the
new block); rest entries (an invalid one, q >= r_b, writes a zero rest_h row and marks the old
padding slot n_b + q - r_b -2 in inverse); and the padding groups z in [Z_b, Zw), whose zero row sits
at block position K + z (merged_rows names it).
"""
import torch
import triton
import triton.language as tl

from ._common import on_device, pow2


@triton.jit
def _compact_kernel(h_ptr, vis_ptr, keep_ptr, rest_ptr, out_ptr, src_ptr, rest_h_ptr, merged_rows_ptr, inv_ptr,
                    n, d, k, R, Z, n_new,
                    stride_hb, stride_hn, stride_hd, stride_vis, stride_kb, stride_kk, stride_rb, stride_rr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    M = k + R
    m_new = k + Z
    # out-of-range starts and slots (unchecked values on a GPU) are clamped: never out of bounds
    start = tl.minimum(tl.maximum(tl.load(vis_ptr + b * stride_vis).to(tl.int64), 0), n - M)
    item_ok = i < n
    is_text = i < n - M
    is_kept = (i >= n - M) & (i < n - R)
    is_rest = (i >= n - R) & item_ok

    # text: rows before the block keep their row, rows after it move by m_new - M
    after = i >= start
    text_src = tl.where(after, i + M, i)
    text_dst = tl.where(after, i + m_new, i)
    # kept #q
    q_kept = tl.where(is_kept, i - (n - M), 0)
    s_kept = tl.load(keep_ptr + b * stride_kb + q_kept * stride_kk, mask=is_kept, other=0).to(tl.int64)
    s_kept = tl.minimum(tl.maximum(s_kept, 0), tl.maximum(M - 1, 0))
    before_rest = s_kept - q_kept
    targets_before = tl.where(Z > 0, (before_rest * Z + R - 1) // tl.maximum(R, 1), 0)
    kept_dst = start + tl.minimum(tl.maximum(q_kept + targets_before, 0), tl.maximum(m_new - 1, 0))
    # rest #q, and whether it is group target z
    q_rest = tl.where(is_rest, i - (n - R), 0)
    s_rest = tl.load(rest_ptr + b * stride_rb + q_rest * stride_rr, mask=is_rest, other=0).to(tl.int64)
    s_rest = tl.minimum(tl.maximum(s_rest, 0), tl.maximum(M - 1, 0))
    z = (q_rest * Z + R - 1) // tl.maximum(R, 1)
    is_target = is_rest & (z < Z) & ((z * R) // tl.maximum(Z, 1) == q_rest)
    target_dst = start + tl.minimum(tl.maximum(z + (s_rest - q_rest), 0), tl.maximum(m_new - 1, 0))

    src_row = tl.where(is_text, text_src, start + tl.where(is_kept, s_kept, s_rest))
    dst_row = tl.where(is_text, text_dst, tl.where(is_kept, kept_dst, target_dst))
    writes_row = (is_text | is_kept | is_target) & item_ok  # into h_new
    carries = (is_text | is_kept) & item_ok  # its own state stays: inverse >= 0

    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        col = d0 + dd
        col_ok = col < d
        x = tl.load(h_ptr + b * stride_hb + src_row[:, None] * stride_hn + col[None, :] * stride_hd,
                    mask=item_ok[:, None] & col_ok[None, :], other=0.0)
        tl.store(out_ptr + (b * n_new + dst_row)[:, None] * d + col[None, :], x,
                 mask=writes_row[:, None] & col_ok[None, :])
        tl.store(rest_h_ptr + (b * R + q_rest)[:, None] * d + col[None, :], x, mask=is_rest[:, None] & col_ok[None, :])

    tl.store(src_ptr + b * n_new + dst_row, b * n + src_row, mask=writes_row)
    tl.store(inv_ptr + b * n + src_row, tl.where(carries, b * n_new + dst_row, -1), mask=item_ok)
    tl.store(merged_rows_ptr + b * Z + z, b * n_new + target_dst, mask=is_target)


@triton.jit
def _count_valid(ptr, stride, W, BLOCK: tl.constexpr):
    """How many entries of an index row are >= 0 (valid entries form a prefix; -1 after)."""
    total = 0
    for j0 in range(0, W, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        v = tl.load(ptr + j.to(tl.int64) * stride, mask=j < W, other=-1)
        total += tl.sum((v >= 0).to(tl.int32), axis=0)
    return total.to(tl.int64)


@triton.jit
def _compact_ragged_kernel(h_ptr, vis_ptr, keep_ptr, rest_ptr, zb_ptr, out_ptr, src_ptr, rest_h_ptr, merged_rows_ptr,
                           inv_ptr, n, d, K, M, Zw, n_new,
                           stride_hb, stride_hn, stride_hd, stride_vis, stride_kb, stride_kk, stride_rb, stride_rr,
                           stride_zb,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    m_new = K + Zw
    kb = _count_valid(keep_ptr + b * stride_kb, stride_kk, K, BLOCK_C)
    rb = _count_valid(rest_ptr + b * stride_rb, stride_rr, M, BLOCK_C)
    Zb = tl.minimum(tl.maximum(tl.load(zb_ptr + b * stride_zb).to(tl.int64), 0), tl.minimum(Zw, rb))
    nb = kb + rb
    start = tl.minimum(tl.maximum(tl.load(vis_ptr + b * stride_vis).to(tl.int64), 0), n - M)
    T = n - M  # text rows
    is_text = i < T
    in_kept = (i >= T) & (i < T + K)
    in_rest = (i >= T + K) & (i < T + K + M)
    in_pad = (i >= T + K + M) & (i < T + K + M + Zw)

    after = i >= start
    text_src = tl.where(after, i + M, i)
    text_dst = tl.where(after, i + m_new, i)
    # kept entry q: a valid one lands at q + ceil((s - q) Z_b / r_b), an invalid one is padding row Z_b + q
    q_kept = tl.where(in_kept, i - T, 0)
    kept_ok = in_kept & (q_kept < kb)
    s_kept = tl.load(keep_ptr + b * stride_kb + q_kept * stride_kk, mask=kept_ok, other=0).to(tl.int64)
    s_kept = tl.minimum(tl.maximum(s_kept, 0), tl.maximum(M - 1, 0))
    targets_before = tl.where(Zb > 0, ((s_kept - q_kept) * Zb + rb - 1) // tl.maximum(rb, 1), 0)
    kept_pos = tl.where(kept_ok, q_kept + targets_before, Zb + q_kept)
    # rest entry q: rest_h row q; group target z when floor(z r_b / Z_b) == q
    q_rest = tl.where(in_rest, i - T - K, 0)
    rest_ok = in_rest & (q_rest < rb)
    s_rest = tl.load(rest_ptr + b * stride_rb + q_rest * stride_rr, mask=rest_ok, other=0).to(tl.int64)
    s_rest = tl.minimum(tl.maximum(s_rest, 0), tl.maximum(M - 1, 0))
    z = (q_rest * Zb + rb - 1) // tl.maximum(rb, 1)
    is_target = rest_ok & (z < Zb) & ((z * rb) // tl.maximum(Zb, 1) == q_rest)
    target_pos = z + (s_rest - q_rest)
    # padding group z >= Z_b: the zero row at block position K + z
    z_pad = tl.where(in_pad, i - T - K - M, 0)
    pad_ok = in_pad & (z_pad >= Zb)

    zero_row = (in_kept & ~kept_ok) | pad_ok  # new block padding rows
    pos = tl.where(in_kept, kept_pos, tl.where(in_pad, K + z_pad, target_pos))
    pos = tl.minimum(tl.maximum(pos, 0), tl.maximum(m_new - 1, 0))
    src_row = tl.where(is_text, text_src, start + tl.where(kept_ok, s_kept, tl.where(rest_ok, s_rest, 0)))
    dst_row = tl.where(is_text, text_dst, start + pos)
    writes_row = is_text | kept_ok | is_target | zero_row
    reads_row = is_text | kept_ok | rest_ok

    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        col = d0 + dd
        col_ok = col < d
        x = tl.load(h_ptr + b * stride_hb + src_row[:, None] * stride_hn + col[None, :] * stride_hd,
                    mask=reads_row[:, None] & col_ok[None, :], other=0.0)
        tl.store(out_ptr + (b * n_new + dst_row)[:, None] * d + col[None, :], x,
                 mask=writes_row[:, None] & col_ok[None, :])
        tl.store(rest_h_ptr + (b * M + q_rest)[:, None] * d + col[None, :], x, mask=in_rest[:, None] & col_ok[None, :])

    tl.store(src_ptr + b * n_new + dst_row, b * n + src_row, mask=writes_row)
    carried = is_text | kept_ok
    tl.store(inv_ptr + b * n + src_row, tl.where(carried, b * n_new + dst_row, -1), mask=carried | rest_ok)
    old_pad = start + nb + (q_rest - rb)  # an invalid rest entry marks one old padding slot, if any is left
    tl.store(inv_ptr + b * n + old_pad, tl.full([BLOCK_R], -2, tl.int64), mask=in_rest & ~rest_ok & (nb + q_rest - rb < M))
    z_out = tl.where(in_pad, z_pad, z)
    tl.store(merged_rows_ptr + b * Zw + z_out, b * n_new + start + pos, mask=is_target | pad_ok)


def compact_ragged(h, vis_start, keep_idx, rest_idx, num_merged, max_merged):
    """python_ref.compact_ragged's outputs in one launch; grid (B, cdiv(n + K + Zw, BLOCK_R))."""
    B, n, d = h.shape
    K, M, Zw = keep_idx.shape[1], rest_idx.shape[1], max_merged
    n_new = n - M + K + Zw
    dev = h.device
    h_new = torch.empty(B, n_new, d, dtype=h.dtype, device=dev)
    src = torch.empty(B, n_new, dtype=torch.int64, device=dev)
    rest_h = torch.empty(B, M, d, dtype=h.dtype, device=dev)
    merged_rows = torch.empty(B, Zw, dtype=torch.int64, device=dev)
    inverse = torch.empty(B, n, dtype=torch.int64, device=dev)
    if B * n == 0:
        return h_new, src, rest_h, merged_rows, inverse
    block_d = min(pow2(d), 256)
    block_r = max(1, min(16, 4096 // block_d))
    with on_device(h):
        _compact_ragged_kernel[(B, triton.cdiv(n + K + Zw, block_r))](
            h, vis_start, keep_idx, rest_idx, num_merged, h_new, src, rest_h, merged_rows, inverse,
            n, d, K, M, Zw, n_new, *h.stride(), vis_start.stride(0), *keep_idx.stride(), *rest_idx.stride(),
            num_merged.stride(0), BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_C=256, num_warps=4)
    return h_new, src, rest_h, merged_rows, inverse


def compact(h, vis_start, keep_idx, rest_idx, num_merged, max_merged=None):
    """(h_new, src, rest_h, merged_rows, inverse) as python_ref.compact, in one launch.

    h [B, n, d] (any strides), vis_start [B], keep_idx [B, k], rest_idx [B, R] (int32 / int64, any
    strides); outputs contiguous. Grid (B, cdiv(n, BLOCK_R)).
    """
    if isinstance(num_merged, torch.Tensor):
        return compact_ragged(h, vis_start, keep_idx, rest_idx, num_merged, max_merged)
    B, n, d = h.shape
    k, R, Z = keep_idx.shape[1], rest_idx.shape[1], num_merged
    n_new = n - R + Z
    dev = h.device
    h_new = torch.empty(B, n_new, d, dtype=h.dtype, device=dev)
    src = torch.empty(B, n_new, dtype=torch.int64, device=dev)
    rest_h = torch.empty(B, R, d, dtype=h.dtype, device=dev)
    merged_rows = torch.empty(B, Z, dtype=torch.int64, device=dev)
    inverse = torch.empty(B, n, dtype=torch.int64, device=dev)
    if B * n == 0:
        return h_new, src, rest_h, merged_rows, inverse
    block_d = min(pow2(d), 256)
    block_r = max(1, min(16, 4096 // block_d))
    with on_device(h):
        _compact_kernel[(B, triton.cdiv(n, block_r))](
            h, vis_start, keep_idx, rest_idx, h_new, src, rest_h, merged_rows, inverse,
            n, d, k, R, Z, n_new, *h.stride(), vis_start.stride(0), *keep_idx.stride(), *rest_idx.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return h_new, src, rest_h, merged_rows, inverse
