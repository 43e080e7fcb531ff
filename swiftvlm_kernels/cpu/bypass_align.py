import torch

from ._chunks import row_chunks


def bypass_align(h_rest, group, merged_now, merged_then):
    """h_rest + merged_now[group] - merged_then[group] (Eq. 12-13), fp32 math, h_rest's dtype. The drift
    now - then is taken once per group (the same fp32 subtraction the reference does per token), then
    gathered per token with index_select, a chunk of rows at a time. Group -1 (ragged padding) reads a
    zero drift row: the token is copied unchanged."""
    B, Z, d = merged_now.shape
    R = h_rest.shape[1]
    drift = torch.cat([(merged_now.float() - merged_then.float()).reshape(B * Z, d), torch.zeros(1, d)])  # (Eq. 12)
    group = group.to(torch.long)
    ids = (group.clamp(0, max(Z - 1, 0)) + torch.arange(B)[:, None] * Z)  # clamped, as the reference
    ids = torch.where(group >= 0, ids, B * Z).reshape(-1)
    out = torch.empty(B * R, d, dtype=h_rest.dtype)
    rows = h_rest.reshape(B * R, d)
    for lo, hi in row_chunks(B * R, d):
        out[lo:hi] = drift.index_select(0, ids[lo:hi]).add_(rows[lo:hi])  # (Eq. 13): h + drift in fp32
    return out.view(B, R, d)


def bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then):
    """dst[b, rows[b, i]] = bypass_align(...)[b, i], in place; rows whose destination or group is -1
    write nothing. Returns None."""
    B, M, d = dst.shape
    out = bypass_align(h_rest, group, merged_now, merged_then).to(dst.dtype).reshape(B * h_rest.shape[1], d)
    rows = rows.to(torch.long)
    flat = (rows + torch.arange(B, device=rows.device)[:, None] * M).reshape(-1)
    inside = ((rows >= 0) & (rows < M) & (group >= 0)).reshape(-1)
    if not bool(inside.all()):  # rows outside dst write nothing (a CPU tensor: reading it is free)
        flat, out = flat[inside], out[inside]
    try:
        dst.view(B * M, d).index_copy_(0, flat, out)
    except RuntimeError:  # dst's strides do not flatten: write row by row through its own layout
        dst[flat // M, flat % M] = out
