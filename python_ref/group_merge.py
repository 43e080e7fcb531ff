import torch


def group_targets(R: int, Z: int, device=None):
    """Group targets t_z = floor(z * R / Z), z = 0..Z-1 (int64 [Z], strictly increasing for Z <= R)."""
    return torch.div(torch.arange(Z, device=device) * R, Z, rounding_mode="floor")


def group_merge(h, num_groups: int):
    """Group the rest tokens by cosine similarity to Z targets and average each group (Eq. 10-11).

    h: [B, R, d]. Every target t_z is in group z; every other token i joins
    argmax_z cos(h_i, h_{t_z}) (ties -> lowest z; NaN similarity ranks lowest).
    Returns merged [B, Z, d] in h's dtype (fp32 accumulation), group int64 [B, R], counts int32 [B, Z].

    The cosine is computed in fp64 and rounded once to fp32: no fp32 input overflows or underflows
    its norm there (|h| from 1e-38 to 3e38), and every backend rounds to the same fp32 value except
    within 1e-16 of a rounding boundary, so exact ties (parallel vectors) go to the lowest z on every
    backend. A zero vector has similarity 0 to everything.
    """
    B, R, d = h.shape
    Z = num_groups
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
