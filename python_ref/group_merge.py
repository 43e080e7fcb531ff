import torch


def group_targets(R: int, Z: int, device=None):
    """Group targets t_z = floor(z * R / Z), z = 0..Z-1 (int64 [Z], strictly increasing for Z <= R)."""
    return torch.div(torch.arange(Z, device=device) * R, Z, rounding_mode="floor")


def group_merge(h, num_groups, lengths=None, max_groups=None):
    """Group the rest tokens by cosine similarity to Z targets and average each group (Eq. 10-11).

    h: [B, R, d]. Every target t_z is in group z; every other token i joins
    argmax_z cos(h_i, h_{t_z}) (ties -> lowest z; NaN similarity ranks lowest).
    Returns merged [B, Z, d] in h's dtype (fp32 accumulation), group int64 [B, R], counts int32 [B, Z].

    The cosine is computed in fp64 and rounded once to fp32: no fp32 input overflows or underflows
    its norm there (|h| from 1e-38 to 3e38), and every backend rounds to the same fp32 value except
    within 1e-16 of a rounding boundary, so exact ties (parallel vectors) go to the lowest z on every
    backend. A zero vector has similarity 0 to everything.

    Ragged batches: `lengths` [B] rows of each sample (default R; the rows after them are padding) and
    num_groups an int or an integer tensor [B] of Z_b, 1 <= Z_b <= lengths[b] (0 for an empty sample);
    the targets of sample b are floor(z * lengths[b] / Z_b). merged [B, max_groups, d] (default: the
    largest Z_b) and counts hold zeros past Z_b, group holds -1 past lengths[b].
    """
    B, R, d = h.shape
    if lengths is None and not isinstance(num_groups, torch.Tensor):
        return _group_merge(h, num_groups)
    from .tv_score import padded_width

    dev = h.device
    n = lengths.to(device=dev, dtype=torch.long) if lengths is not None else torch.full((B,), R, device=dev)
    Z_b = num_groups.to(device=dev, dtype=torch.long) if isinstance(num_groups, torch.Tensor) else \
        torch.full((B,), num_groups, device=dev)
    Z = padded_width(Z_b, max_groups) if isinstance(num_groups, torch.Tensor) else num_groups
    z = torch.arange(Z, device=dev)
    group_ok = z[None, :] < Z_b[:, None]  # [B, Z]
    targets = torch.where(group_ok, torch.div(z[None, :] * n[:, None], Z_b.clamp_min(1)[:, None],
                                              rounding_mode="floor"), 0)
    hd = h.double()
    unit = hd / hd.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    unit_t = torch.gather(unit, 1, targets[:, :, None].expand(B, Z, d))
    sim = torch.matmul(unit, unit_t.transpose(1, 2)).float()  # [B, R, Z]  (Eq. 10)
    sim = torch.where(torch.isnan(sim) | ~group_ok[:, None, :], torch.full_like(sim, float("-inf")), sim)
    group = sim.argmax(dim=-1) if Z else torch.zeros(B, R, dtype=torch.long, device=dev)
    # a target always leads its own group (groups past Z_b name row 0, the target of group 0, again)
    group.scatter_(1, targets, torch.where(group_ok, z[None, :], 0))
    row_ok = torch.arange(R, device=dev)[None, :] < n[:, None]
    group = torch.where(row_ok, group, -1)
    slot = torch.where(row_ok, group, Z)  # padding rows go to an extra slot, dropped below
    counts = torch.zeros(B, Z + 1, dtype=torch.int32, device=dev)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.int32))
    sums = torch.zeros(B, Z + 1, d, dtype=torch.float32, device=dev)
    sums.scatter_add_(1, slot[:, :, None].expand(B, R, d), h.float())
    counts, sums = counts[:, :Z].contiguous(), sums[:, :Z]
    merged = torch.where(counts[:, :, None] > 0, sums / counts.clamp_min(1)[:, :, None].float(), 0.0)  # (Eq. 11)
    return merged.to(h.dtype), group, counts


def _group_merge(h, Z):
    B, R, d = h.shape
    t = group_targets(R, Z, h.device)
    hf = h.float()
    hd = h.double()
    unit = hd / hd.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    sim = torch.matmul(unit, unit[:, t].transpose(1, 2)).float()  # [B, R, Z]  (Eq. 10)
    sim = torch.where(torch.isnan(sim), torch.full_like(sim, float("-inf")), sim)
    group = sim.argmax(dim=-1)  # first maximum -> lowest z on ties
    group[:, t] = torch.arange(Z, device=h.device)  # a target always leads its own group
    counts = torch.zeros(B, Z, dtype=torch.int32, device=h.device)
    counts.scatter_add_(1, group, torch.ones_like(group, dtype=torch.int32))
    sums = torch.zeros(B, Z, d, dtype=torch.float32, device=h.device)
    sums.scatter_add_(1, group[:, :, None].expand(B, R, d), hf)
    merged = sums / counts[:, :, None].float()  # (Eq. 11)
    return merged.to(h.dtype), group, counts
