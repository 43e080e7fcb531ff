import torch

from .group_merge import group_targets


def compact(h, vis_start, keep_idx, rest_idx, num_merged, max_merged=None):
    """Rebuild a sequence after a pruning stage: its visual block keeps the kept tokens and one row per
    group target of the rest, in position order; the rest tokens are set aside.

    h: [B, n, d], a sequence whose visual block of M = k + R rows starts at row vis_start[b];
    keep_idx [B, k] and rest_idx [B, R]: ascending block slots that partition 0..M-1 (score_select's
    keep_idx / rest_idx); Z = num_merged in [0, R] (Z >= 1 when R >= 1 and the rest is merged, 0 when it
    is dropped). Group targets: rest_idx[b, floor(z R / Z)], z = 0..Z-1 (as group_merge's).

    Returns, with n' = n - M + k + Z:
      h_new        [B, n', d]: the rows before the block, the new block (kept slots and targets in
                   slot order, each row its token's state; a target's row is where its merged token
                   goes), the rows after the block;
      src          int64 [B, n']: for each new row, the row of h it came from, flattened (b * n + row);
      rest_h       [B, R, d]: the rest tokens' rows h[b, vis_start + rest_idx];
      merged_rows  int64 [B, Z]: where target z sits in h_new, flattened (b * n' + row);
      inverse      int64 [B, n]: for each row of h, the flattened row of h_new that carries it (text
                   and kept rows), -1 for the rest tokens (targets included).
    """
    if isinstance(num_merged, torch.Tensor):  # a ragged batch
        return compact_ragged(h, vis_start, keep_idx, rest_idx, num_merged, max_merged)
    B, n, d = h.shape
    k, R, Z = keep_idx.shape[1], rest_idx.shape[1], num_merged
    M, m_new = k + R, k + Z
    n_new = n - M + m_new
    dev = h.device
    start = vis_start.to(torch.long)[:, None]
    targets = rest_idx[:, group_targets(R, Z, dev)] if Z else rest_idx[:, :0]
    slots, order = torch.sort(torch.cat([keep_idx, targets], 1).to(torch.long), dim=1)
    j = torch.arange(n_new, device=dev)
    rel = j - start  # [B, n']
    in_block = (rel >= 0) & (rel < m_new)
    block_row = start + slots.gather(1, rel.clamp(0, max(m_new - 1, 0))) if m_new else rel
    row = torch.where(rel < 0, j, torch.where(in_block, block_row, j - m_new + M))
    src = row + torch.arange(B, device=dev)[:, None] * n
    h_new = h.reshape(B * n, d)[src.reshape(-1)].reshape(B, n_new, d)
    rest_h = h.gather(1, (start + rest_idx.to(torch.long))[:, :, None].expand(B, R, d))
    position = order.argsort(1)  # where each of kept..., targets... sits in the new block
    merged_rows = start + position[:, k:] + torch.arange(B, device=dev)[:, None] * n_new
    kept = order < k  # new rows that carry a row of h itself: text, and kept block slots
    carries = ~in_block | kept.gather(1, rel.clamp(0, max(m_new - 1, 0))) if m_new else ~in_block
    new_flat = j + torch.arange(B, device=dev)[:, None] * n_new
    # rows that carry nothing write into one extra slot, dropped after (no boolean indexing)
    inverse = torch.full((B * n + 1,), -1, dtype=torch.long, device=dev)
    inverse.scatter_(0, torch.where(carries, src, B * n).reshape(-1), new_flat.reshape(-1))
    return h_new, src, rest_h, merged_rows, inverse[:-1].reshape(B, n)


def compact_ragged(h, vis_start, keep_idx, rest_idx, num_merged, max_merged=None):
    """compact for a ragged batch (score_select.ragged's outputs): keep_idx [B, K] and rest_idx [B, M]
    hold each sample's ascending block slots, then -1 (M = rest_idx.shape[1] is the visual block's
    width, slots past a sample's own count are padding rows); num_merged an int tensor [B] of Z_b
    (0 <= Z_b <= the sample's rest count r_b, Z_b >= 1 when merging), padded width max_merged.

    Sample b's new block holds its k_b kept slots and Z_b targets in slot order, then K + Zw - k_b - Z_b
    padding rows of zeros (their src: the block's first row). rest_h rows past r_b are zero;
    merged_rows of groups z >= Z_b name the padding row at block slot K + z; inverse is -1 for rest
    rows and -2 for the block's padding rows (restore zeroes those). Everything else as compact.
    """
    from .tv_score import padded_width

    B, n, d = h.shape
    K, M = keep_idx.shape[1], rest_idx.shape[1]
    Zb = num_merged.to(device=h.device, dtype=torch.long)
    Zw = padded_width(Zb, max_merged)
    m_new = K + Zw
    n_new = n - M + m_new
    dev = h.device
    keep, rest = keep_idx.to(torch.long), rest_idx.to(torch.long)
    r_b = (rest >= 0).sum(1)
    start = vis_start.to(torch.long)[:, None]
    # new block position of each kept entry and each target (ascending slots merged), padding after
    q = torch.arange(K, device=dev)[None, :]
    before_rest = keep - q
    targets_before = torch.div(before_rest * Zb[:, None] + r_b[:, None] - 1, r_b.clamp_min(1)[:, None],
                               rounding_mode="floor")
    kept_pos = q + torch.where(Zb[:, None] > 0, targets_before, 0)
    kept_pos = torch.where(keep >= 0, kept_pos, Zb[:, None] + q)  # padding entries: rows k_b + Z_b ..
    z = torch.arange(Zw, device=dev)[None, :]
    t_rank = torch.div(z * r_b[:, None], Zb.clamp_min(1)[:, None], rounding_mode="floor")
    real_group = z < Zb[:, None]
    t_slot = rest.gather(1, t_rank.clamp(0, max(M - 1, 0))) if M else t_rank
    target_pos = torch.where(real_group, z + (t_slot - t_rank), K + z)
    block_src = torch.full((B, m_new), -1, dtype=torch.long, device=dev)  # old slot of each new block row
    block_src.scatter_(1, kept_pos, torch.where(keep >= 0, keep, -1))
    block_src.scatter_(1, target_pos, torch.where(real_group, t_slot, -1))
    j = torch.arange(n_new, device=dev)
    rel = j - start
    in_block = (rel >= 0) & (rel < m_new)
    slot = block_src.gather(1, rel.clamp(0, max(m_new - 1, 0))) if m_new else rel
    padding = in_block & (slot < 0)
    row = torch.where(rel < 0, j, torch.where(in_block, start + slot.clamp_min(0), j - m_new + M))
    base_old = torch.arange(B, device=dev)[:, None] * n
    src = row + base_old
    h_new = h.reshape(B * n, d)[src.reshape(-1)].reshape(B, n_new, d)
    h_new = torch.where(padding[:, :, None], 0, h_new)
    rest_ok = rest >= 0
    rest_h = h.gather(1, (start + rest.clamp_min(0))[:, :, None].expand(B, M, d)) if M else h[:, :0]
    rest_h = torch.where(rest_ok[:, :, None], rest_h, 0)
    merged_rows = start + target_pos + torch.arange(B, device=dev)[:, None] * n_new
    carries = (~in_block | ((slot >= 0) & _is_kept(slot, keep))) if m_new else ~in_block
    new_flat = j + torch.arange(B, device=dev)[:, None] * n_new
    rest_row = torch.zeros(B, n + 1, dtype=torch.bool, device=dev)  # old rows set aside as rest tokens
    rest_row.scatter_(1, torch.where(rest >= 0, start + rest.clamp_min(0), n), True)
    inverse = torch.where(rest_row[:, :n], -1, -2).reshape(-1)
    inverse = torch.cat([inverse, inverse.new_full((1,), -1)])
    inverse.scatter_(0, torch.where(carries, src, B * n).reshape(-1), new_flat.reshape(-1))
    return h_new, src, rest_h, merged_rows, inverse[:-1].reshape(B, n)


def _is_kept(slot, keep):
    """[B, m] whether each old slot is among the sample's kept slots."""
    return (slot[:, :, None] == keep[:, None, :]).any(-1)
