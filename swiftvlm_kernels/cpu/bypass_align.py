import torch


def bypass_align(h_rest, group, merged_now, merged_then):
    """h_rest + merged_now[group] - merged_then[group] (Eq. 12-13), fp32 math, h_rest's dtype. The drift
    now - then is taken once per group (the same fp32 subtraction the reference does per token), then
    gathered per token with one index_select."""
    B, Z, d = merged_now.shape
    drift = (merged_now.float() - merged_then.float()).reshape(B * Z, d)  # (Eq. 12)
    flat = group.to(torch.long).clamp(0, Z - 1) + torch.arange(0, B * Z, Z)[:, None]  # ids clamped, as the reference
    return (h_rest.float() + drift.index_select(0, flat.reshape(-1)).view(h_rest.shape)).to(h_rest.dtype)  # (Eq. 13)


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
