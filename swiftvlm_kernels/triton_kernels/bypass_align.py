"""bypass_align: restore bypassed tokens with their group's drift, h_i + merged_now[g_i] - merged_then[g_i].

One gather-add launch, grid (B * R, cdiv(d, BLOCK_D)), fp32 math. The same kernel writes either a
fresh [B, R, d] output or rows of an existing dst (bypass_align_into). A negative group id (-1: the
padding of a ragged batch) means no drift: bypass_align copies the row, bypass_align_into writes
nothing. Ids >= Z are clamped to Z - 1 and destination rows outside [0, M) are skipped, so bad values
never touch memory out of bounds.
"""
import torch
import triton
import triton.language as tl

from ._common import cast_rne, on_device, pow2


@triton.jit
def _bypass_align_kernel(dst_ptr, rows_ptr, h_ptr, group_ptr, now_ptr, then_ptr, R, Z, d, M,
                         stride_db, stride_dm, stride_dd, stride_rb, stride_rr,
                         stride_hb, stride_hr, stride_hd, stride_gb, stride_gr,
                         stride_nb, stride_nz, stride_nd, stride_tb, stride_tz, stride_td,
                         HAS_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // R
    i = pid % R
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = col < d
    g_raw = tl.load(group_ptr + b * stride_gb + i * stride_gr).to(tl.int64)
    g = tl.minimum(tl.maximum(g_raw, 0), Z - 1)
    if HAS_ROWS:
        row = tl.load(rows_ptr + b * stride_rb + i * stride_rr).to(tl.int64)
        store_cols = tl.where((row >= 0) & (row < M) & (g_raw >= 0), d, 0)  # nothing written for these
    else:
        row = i
        store_cols = d
    drift_cols = tl.where((g_raw < 0) | (g < 0), 0, d)  # a negative group id (or Z = 0): no drift

    x = tl.load(h_ptr + b * stride_hb + i * stride_hr + col * stride_hd, mask=col_ok, other=0.0)
    now = tl.load(now_ptr + b * stride_nb + g * stride_nz + col * stride_nd, mask=col < drift_cols, other=0.0)
    then = tl.load(then_ptr + b * stride_tb + g * stride_tz + col * stride_td, mask=col < drift_cols, other=0.0)
    drift = now.to(tl.float32) - then.to(tl.float32)  # Eq. 12
    out = x.to(tl.float32) + drift  # Eq. 13
    tl.store(dst_ptr + b * stride_db + row * stride_dm + col * stride_dd,
             cast_rne(out, dst_ptr.dtype.element_ty), mask=col < store_cols)


def _launch(dst, rows, h_rest, group, merged_now, merged_then):
    B, R, d = h_rest.shape
    if B * R * d == 0:
        return
    block_d = min(pow2(d), 1024)
    has_rows = rows is not None
    row_strides = (rows.stride(0), rows.stride(1)) if has_rows else (0, 0)
    with on_device(h_rest):
        _bypass_align_kernel[(B * R, triton.cdiv(d, block_d))](
            dst, rows if has_rows else group, h_rest, group, merged_now, merged_then,
            R, merged_now.shape[1], d, dst.shape[1],
            *dst.stride(), *row_strides, *h_rest.stride(), *group.stride(),
            *merged_now.stride(), *merged_then.stride(),
            HAS_ROWS=has_rows, BLOCK_D=block_d, num_warps=4 if block_d >= 512 else 2)


def bypass_align(h_rest, group, merged_now, merged_then):
    """h_rest.dtype [B, R, d]: h_rest + merged_now[group] - merged_then[group] in fp32 (Eq. 12-13).

    All inputs are read in place through their strides (no copies); the output is contiguous.
    One launch, grid (B * R, cdiv(d, BLOCK_D)).
    """
    out = torch.empty(h_rest.shape, dtype=h_rest.dtype, device=h_rest.device)
    _launch(out, None, h_rest, group, merged_now, merged_then)
    return out


def bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then):
    """dst[b, rows[b, i]] = bypass_align(...)[b, i], written straight into dst (any strides). Returns None.

    Inputs are read in place through their strides. One launch, grid (B * R, cdiv(d, BLOCK_D)).
    """
    _launch(dst, rows, h_rest, group, merged_now, merged_then)
