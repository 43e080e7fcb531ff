import torch

from .bypass_align import bypass_align


def restore(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then):
    """Undo a `compact` after the layers in between: every row of the earlier sequence returns, the
    rest tokens shifted by their merged token's drift (Eq. 12-13).

    h: [B, n', d] the compacted sequence now; inverse int64 [B, n] (compact's): the flattened row of
    h carrying each earlier row, -1 for rest tokens; rest_idx [B, R]: the rest tokens' block slots
    (their rows are vis_start[b] + rest_idx[b, i]); h_rest [B, R, d]: their states when set aside;
    group int [B, R]: their merged token; merged_rows int64 [B, Z] (compact's): where the merged
    tokens sit in h, flattened; merged_then [B, Z, d]: the merged tokens when made.
    Returns [B, n, d] in h's dtype: h[inverse] on carried rows, and on rest rows
    h_rest + h[merged_rows[group]] - merged_then[group] in fp32 math.

    Z = 0 (merged_rows [B, 0], merged_then [B, 0, d]: a stage that merged nothing, such as an ALVTS
    stage whose skipped tokens rejoin after its layer): every rest token comes back UNCHANGED, h_rest
    copied bit for bit; group is not read (any values).

    Ragged batches (compact_ragged's outputs): rest entries whose slot is -1 restore nothing; rows
    whose inverse is -2 (the padding rows of a sample's block) are zero. Every row marked -1 in
    inverse is restored by exactly one rest entry (checked).
    """
    B, n_cur, d = h.shape
    n = inverse.shape[1]
    flat = h.reshape(B * n_cur, d)
    out = flat[inverse.clamp_min(0).reshape(-1)].reshape(B, n, d)
    out = torch.where((inverse >= 0)[:, :, None], out, 0)
    rows = vis_start.to(torch.long)[:, None] + rest_idx.to(torch.long)
    if merged_then.shape[1] == 0:  # nothing merged: the rest tokens as they were set aside
        restored, write = h_rest, rest_idx >= 0
    else:
        merged_now = flat[merged_rows.reshape(-1)].reshape(merged_then.shape)
        restored, write = bypass_align(h_rest, group, merged_now, merged_then), (rest_idx >= 0) & (group >= 0)
    rows = torch.where(write, rows, n)  # skipped entries land in an extra row, dropped below
    out = torch.cat([out, out.new_zeros(B, 1, d)], 1)
    out.scatter_(1, rows[:, :, None].expand(-1, -1, d), restored.to(out.dtype))
    return out[:, :n].contiguous()
