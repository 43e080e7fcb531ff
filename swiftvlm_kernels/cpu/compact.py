import functools

import torch

from python_ref import group_targets


@functools.lru_cache(maxsize=64)
def _targets(R: int, Z: int):
    return group_targets(R, Z), torch.arange(Z)


def compact(h, vis_start, keep_idx, rest_idx, num_merged, max_merged=None):
    """python_ref.compact's outputs, placed by arithmetic (no sort) and moved with index_select:
    kept #q at slot s goes to block position q + ceil((s - q) Z / R), target z at slot s to
    z + (s - floor(z R / Z))."""
    if isinstance(num_merged, torch.Tensor):  # a ragged batch
        return compact_ragged(h, vis_start, keep_idx, rest_idx, num_merged, max_merged)
    B, n, d = h.shape
    k, R, Z = keep_idx.shape[1], rest_idx.shape[1], num_merged
    M, m_new = k + R, k + Z
    n_new = n - M + m_new
    keep, rest = keep_idx.long(), rest_idx.long()
    q = torch.arange(k)
    block = torch.empty(B, m_new, dtype=torch.long)  # the new block's old slots
    kept_pos = q + torch.div((keep - q) * Z + R - 1, max(R, 1), rounding_mode="floor") if Z else q.expand(B, k)
    block.scatter_(1, kept_pos, keep)
    if Z:
        t, z = _targets(R, Z)
        targets = rest.index_select(1, t)
        target_pos = z + (targets - t)
        block.scatter_(1, target_pos, targets)
    start = vis_start.long()[:, None]
    j = torch.arange(n_new)
    rel = j - start
    after = j - m_new + M
    row = torch.where(rel < 0, j, torch.where(rel < m_new, start + block.gather(1, rel.clamp(0, m_new - 1)), after)
                      if m_new else after)
    base_old, base_new = torch.arange(B)[:, None] * n, torch.arange(B)[:, None] * n_new
    src = row + base_old
    flat = h.reshape(B * n, d)
    h_new = flat.index_select(0, src.view(-1)).view(B, n_new, d)
    rest_h = flat.index_select(0, (start + rest + base_old).view(-1)).view(B, R, d)
    merged_rows = start + target_pos + base_new if Z else torch.empty(B, 0, dtype=torch.long)
    inverse = torch.full((B, n), -1, dtype=torch.long)
    text = (rel < 0) | (rel >= m_new)
    inverse.view(-1).index_copy_(0, src[text], (j + base_new)[text])  # text rows (CPU: boolean masks are free)
    inverse.view(-1).index_copy_(0, (start + keep + base_old).view(-1), (start + kept_pos + base_new).reshape(-1))
    return h_new, src, rest_h, merged_rows, inverse


def compact_ragged(h, vis_start, keep_idx, rest_idx, num_merged, max_merged=None):
    """python_ref.compact_ragged (ragged batches; see there)."""
    from python_ref.compact import compact_ragged as reference

    return reference(h, vis_start, keep_idx, rest_idx, num_merged, max_merged)
