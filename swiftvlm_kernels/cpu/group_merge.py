import functools

import torch

from python_ref import group_targets


@functools.lru_cache(maxsize=64)
def _targets(R: int, Z: int):
    """t_z = floor(z R / Z) and 0..Z-1, made once per (R, Z)."""
    return group_targets(R, Z), torch.arange(Z)


def group_merge(h, num_groups: int):
    """python_ref.group_merge's arithmetic; the group sums by index_add_ (members added in index
    order, as the reference's scatter_add_, without an expanded [B, R, d] index)."""
    B, R, d = h.shape
    Z = num_groups
    t, ids = _targets(R, Z)
    hf = h.float()
    unit = hf / hf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = torch.matmul(unit, unit[:, t].transpose(1, 2))  # [B, R, Z]  (Eq. 10)
    group = sim.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).argmax(dim=-1)
    group[:, t] = ids  # a target always leads its own group; ties -> lowest z (first maximum)
    flat = (group + torch.arange(0, B * Z, Z)[:, None]).reshape(-1)
    counts = torch.bincount(flat, minlength=B * Z)
    sums = torch.zeros(B * Z, d).index_add_(0, flat, hf.reshape(B * R, d))
    merged = sums / counts[:, None]  # (Eq. 11)
    return merged.reshape(B, Z, d).to(h.dtype), group, counts.reshape(B, Z).int()
