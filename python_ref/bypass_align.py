import torch


def _gather_groups(merged, group):
    B, Z, d = merged.shape
    idx = group.to(torch.long).clamp(0, max(Z - 1, 0))[:, :, None].expand(-1, -1, d)
    return torch.gather(merged.float(), 1, idx) if Z else merged.new_zeros(B, group.shape[1], d, dtype=torch.float32)


def bypass_align(h_rest, group, merged_now, merged_then):
    """Restore bypassed tokens: h_i + (merged_now[g_i] - merged_then[g_i]) (Eq. 12-13).

    h_rest: [B, R, d]; group: int [B, R]; merged_now / merged_then: [B, Z, d]. fp32 math, output in
    h_rest's dtype. A row whose group is -1 (the padding of a ragged batch) is copied unchanged.
    """
    offset = _gather_groups(merged_now, group) - _gather_groups(merged_then, group)  # (Eq. 12)
    out = h_rest.float() + offset  # (Eq. 13)
    return torch.where((group >= 0)[:, :, None], out, h_rest.float()).to(h_rest.dtype)


def bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then):
    """bypass_align written in place: dst[b, rows[b, i]] = bypass_align(...)[b, i]. Returns None.
    Rows i whose destination rows[b, i] or group[b, i] is -1 (ragged padding) write nothing."""
    out = bypass_align(h_rest, group, merged_now, merged_then)
    write = (rows >= 0) & (group >= 0)
    M = dst.shape[1]
    # skipped rows go to an extra row of a scratch copy of dst's shape, dropped after the scatter
    idx = torch.where(write, rows.to(torch.long), M)[:, :, None].expand(-1, -1, dst.shape[-1])
    scratch = torch.cat([dst, dst.new_zeros(dst.shape[0], 1, dst.shape[2])], 1)
    scratch.scatter_(1, idx, out.to(dst.dtype))
    dst.copy_(scratch[:, :M])
