import torch

from .group_merge import group_targets


def compact(h, vis_start, keep_idx, rest_idx, num_merged: int):
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
