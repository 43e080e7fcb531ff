import torch

from .bypass_align import bypass_align


def restore(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then):
    """python_ref.restore with index_select / index_copy_ on flattened rows (ragged entries of -1 restore
    nothing; rows neither carried nor restored are zero; Z = 0: the rest rows copied unchanged)."""
    B, n_cur, d = h.shape
    n = inverse.shape[1]
    flat = h.reshape(B * n_cur, d)
    out = flat.index_select(0, inverse.clamp_min(0).view(-1))  # rest rows: overwritten below
    loose = inverse.view(-1) < 0
    out[loose] = 0  # CPU tensors: a boolean mask costs no sync
    rows = (vis_start.long()[:, None] + rest_idx.long() + torch.arange(B)[:, None] * n).view(-1)
    if merged_then.shape[1] == 0:  # nothing merged: group is not read
        restored, write = h_rest.reshape(B * rest_idx.shape[1], d), (rest_idx >= 0).view(-1)
    else:
        merged_now = flat.index_select(0, merged_rows.reshape(-1)).view(merged_then.shape)
        restored = bypass_align(h_rest, group, merged_now, merged_then).view(B * rest_idx.shape[1], d)
        write = ((rest_idx >= 0) & (group >= 0)).view(-1)
    if not bool(write.all()):
        rows, restored = rows[write], restored[write]
    out.index_copy_(0, rows, restored)
    return out.view(B, n, d)
