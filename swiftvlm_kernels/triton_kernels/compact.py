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


def compact(h, vis_start, keep_idx, rest_idx, num_merged: int):
    """(h_new, src, rest_h, merged_rows, inverse) as python_ref.compact, in one launch.

    h [B, n, d] (any strides), vis_start [B], keep_idx [B, k], rest_idx [B, R] (int32 / int64, any
    strides); outputs contiguous. Grid (B, cdiv(n, BLOCK_R)).
    """
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
