import torch


def _rows(merged, group):
    """merged[b, group[b, i]] as fp32 [B, R, d] (ids clamped into [0, Z), as the reference)."""
    B, Z, d = merged.shape
    flat = group.to(torch.long).clamp(0, Z - 1) + torch.arange(B, device=group.device)[:, None] * Z
    return merged.reshape(B * Z, d).index_select(0, flat.reshape(-1)).float().reshape(B, -1, d)


def bypass_align(h_rest, group, merged_now, merged_then):
    """h_rest + merged_now[group] - merged_then[group] (Eq. 12-13), fp32 math, h_rest's dtype."""
    offset = _rows(merged_now, group) - _rows(merged_then, group)  # (Eq. 12)
    return (h_rest.float() + offset).to(h_rest.dtype)  # (Eq. 13)


def bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then):
    """dst[b, rows[b, i]] = bypass_align(...)[b, i], in place. Returns None."""
    out = bypass_align(h_rest, group, merged_now, merged_then).to(dst.dtype).reshape(-1, dst.shape[-1])
    B, M, d = dst.shape
    rows = rows.to(torch.long)
    flat = (rows + torch.arange(B, device=rows.device)[:, None] * M).reshape(-1)
    inside = ((rows >= 0) & (rows < M)).reshape(-1)
    if not bool(inside.all()):  # rows outside dst write nothing (a CPU tensor: reading it is free)
        flat, out = flat[inside], out[inside]
    try:
        dst.view(B * M, d).index_copy_(0, flat, out)
    except RuntimeError:  # dst's strides do not flatten: write row by row through its own layout
        dst[flat // M, flat % M] = out
