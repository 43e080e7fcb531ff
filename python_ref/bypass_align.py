import torch


def _gather_groups(merged, group):
    B, Z, d = merged.shape
    idx = group.to(torch.long).clamp(0, Z - 1)[:, :, None].expand(-1, -1, d)
    return torch.gather(merged.float(), 1, idx)


def bypass_align(h_rest, group, merged_now, merged_then):
    """Restore bypassed tokens: h_i + (merged_now[g_i] - merged_then[g_i]) (Eq. 12-13).

    h_rest: [B, R, d]; group: int [B, R]; merged_now / merged_then: [B, Z, d]. fp32 math, output in
    h_rest's dtype.
    """
    offset = _gather_groups(merged_now, group) - _gather_groups(merged_then, group)  # (Eq. 12)
    return (h_rest.float() + offset).to(h_rest.dtype)  # (Eq. 13)


def bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then):
    """bypass_align written in place: dst[b, rows[b, i]] = bypass_align(...)[b, i]. Returns None."""
    out = bypass_align(h_rest, group, merged_now, merged_then)
    idx = rows.to(torch.long)[:, :, None].expand(-1, -1, dst.shape[-1])
    dst.scatter_(1, idx, out.to(dst.dtype))
