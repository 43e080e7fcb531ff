"""restore: undo a compact after the layers in between, in one launch (python_ref/restore.py has the
contract; Eq. 12-13 for the rest tokens).

Grid (B, cdiv(n + R, BLOCK_R)): one program handles BLOCK_R items of sample b, numbered
  [0, n)       the rows of the restored sequence that a row of h carries (inverse >= 0): copied;
               a ragged block's padding rows (inverse -2): zero,
  [n, n + R)   the rest tokens: h_rest + h[merged_rows[g]] - merged_then[g] in fp32 (g clamped into
               [0, Z)), written to row vis_start + rest_idx (skipped outside [0, n), and for the
               ragged padding entries, rest_idx or group -1); with Z = 0 (nothing merged) h_rest
               itself, copied unchanged, group not read.
The two sets of rows are disjoint (compact marks every rest row -1 in inverse).
"""
import torch
import triton
import triton.language as tl

from ._common import cast_rne, on_device, pow2


@triton.jit
def _restore_kernel(h_ptr, inv_ptr, vis_ptr, rest_ptr, h_rest_ptr, group_ptr, mrows_ptr, then_ptr, out_ptr,
                    n, n_cur, d, R, Z, B,
                    stride_hb, stride_hn, stride_hd, stride_ib, stride_in, stride_vis, stride_rb, stride_rr,
                    stride_xb, stride_xr, stride_xd, stride_gb, stride_gr, stride_mb, stride_mz,
                    stride_tb, stride_tz, stride_td,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    is_row = i < n
    is_rest = (i >= n) & (i < n + R)
    # carried rows: the flattened row of h, clamped so a bad id never reads out of bounds
    src = tl.load(inv_ptr + b * stride_ib + i * stride_in, mask=is_row, other=-1).to(tl.int64)
    copies = is_row & (src >= 0)
    zeros = is_row & (src == -2)
    src = tl.minimum(tl.maximum(src, 0), B * n_cur - 1)
    src_b = src // tl.maximum(n_cur, 1)
    src_r = src % tl.maximum(n_cur, 1)
    # rest tokens
    q = tl.where(is_rest, i - n, 0)
    slot = tl.load(rest_ptr + b * stride_rb + q * stride_rr, mask=is_rest, other=0).to(tl.int64)
    row = tl.load(vis_ptr + b * stride_vis).to(tl.int64) + slot
    g = tl.load(group_ptr + b * stride_gb + q * stride_gr, mask=is_rest, other=0).to(tl.int64)
    # Z = 0: nothing was merged, the rest tokens come back unchanged (group not read)
    merged = (tl.zeros_like(g) + Z) > 0
    writes_rest = is_rest & (row >= 0) & (row < n) & (slot >= 0) & ((g >= 0) | ~merged)
    drifts = writes_rest & merged
    g = tl.minimum(tl.maximum(g, 0), tl.maximum(Z - 1, 0))
    now = tl.load(mrows_ptr + b * stride_mb + g * stride_mz, mask=drifts, other=0).to(tl.int64)
    now = tl.minimum(tl.maximum(now, 0), B * n_cur - 1)
    now_b = now // tl.maximum(n_cur, 1)
    now_r = now % tl.maximum(n_cur, 1)
    dst = tl.where(is_rest, row, i)

    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        col = d0 + dd
        col_ok = col < d
        copied = tl.load(h_ptr + src_b[:, None] * stride_hb + src_r[:, None] * stride_hn + col[None, :] * stride_hd,
                         mask=copies[:, None] & col_ok[None, :], other=0.0)
        rest_mask = writes_rest[:, None] & col_ok[None, :]
        drift_mask = drifts[:, None] & col_ok[None, :]
        kept = tl.load(h_rest_ptr + b * stride_xb + q[:, None] * stride_xr + col[None, :] * stride_xd,
                       mask=rest_mask, other=0.0)
        merged_now = tl.load(h_ptr + now_b[:, None] * stride_hb + now_r[:, None] * stride_hn + col[None, :] * stride_hd,
                             mask=drift_mask, other=0.0).to(tl.float32)
        merged_then = tl.load(then_ptr + b * stride_tb + g[:, None] * stride_tz + col[None, :] * stride_td,
                              mask=drift_mask, other=0.0).to(tl.float32)
        aligned = cast_rne(kept.to(tl.float32) + (merged_now - merged_then), out_ptr.dtype.element_ty)  # Eq. 12-13
        rest_value = tl.where(drifts[:, None], aligned, kept.to(out_ptr.dtype.element_ty))
        value = tl.where(is_rest[:, None], rest_value, copied)
        tl.store(out_ptr + (b * n + dst)[:, None] * d + col[None, :], value,
                 mask=(copies | zeros | writes_rest)[:, None] & col_ok[None, :])


def restore(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then):
    """[B, n, d] in h's dtype, as python_ref.restore, in one launch. Inputs any strides."""
    B, n_cur, d = h.shape
    n, R, Z = inverse.shape[1], rest_idx.shape[1], merged_then.shape[1]
    out = torch.empty(B, n, d, dtype=h.dtype, device=h.device)
    if B * n * d == 0:
        return out
    block_d = min(pow2(d), 256)
    block_r = max(1, min(16, 4096 // block_d))
    with on_device(h):
        _restore_kernel[(B, triton.cdiv(n + R, block_r))](
            h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then, out,
            n, n_cur, d, R, Z, B, *h.stride(), *inverse.stride(), vis_start.stride(0), *rest_idx.stride(),
            *h_rest.stride(), *group.stride(), *merged_rows.stride(), *merged_then.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out
