import functools

import torch

from python_ref import group_targets

from ._chunks import row_chunks


@functools.lru_cache(maxsize=64)
def _targets(R: int, Z: int):
    """t_z = floor(z R / Z) and 0..Z-1, made once per (R, Z)."""
    return group_targets(R, Z), torch.arange(Z)


def _unit(x):
    xd = x.double()
    return xd / xd.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def group_merge(h, num_groups, lengths=None, max_groups=None):
    """python_ref.group_merge's arithmetic a chunk of tokens at a time: each token's fp64 unit vector and
    its cosine to the Z targets rounded to fp32 (Eq. 10), then the group sums by index_add_ (members
    added in index order, as the reference's scatter_add_, without an expanded [B, R, d] index)."""
    if isinstance(num_groups, torch.Tensor) or lengths is not None:
        return _ragged(h, num_groups, lengths, max_groups)
    B, R, d = h.shape
    Z = num_groups
    t, ids = _targets(R, Z)
    targets = _unit(h[:, t]).transpose(1, 2)  # [B, d, Z]
    group = torch.empty(B, R, dtype=torch.long)
    for b in range(B):
        for lo, hi in row_chunks(R, 2 * d):  # fp64 rows count twice
            sim = torch.matmul(_unit(h[b, lo:hi]), targets[b]).float()  # [rows, Z]  (Eq. 10)
            group[b, lo:hi] = sim.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).argmax(-1)
    flat_h = h.reshape(B * R, d)
    group[:, t] = ids  # a target always leads its own group; ties -> lowest z (first maximum)
    flat = (group + torch.arange(B)[:, None] * Z).reshape(-1)
    counts = torch.bincount(flat, minlength=B * Z)
    sums = torch.zeros(B * Z, d)
    for lo, hi in row_chunks(B * R, d):
        sums.index_add_(0, flat[lo:hi], flat_h[lo:hi].float())
    merged = sums / counts[:, None]  # (Eq. 11)
    return merged.reshape(B, Z, d).to(h.dtype), group, counts.reshape(B, Z).int()


def _ragged(h, num_groups, lengths, max_groups):
    """A ragged batch: each sample alone (its own rows and groups) into the padded outputs, which is
    python_ref's ragged contract (zeros / -1 past a sample's groups / rows)."""
    B, R, d = h.shape
    n = lengths.tolist() if lengths is not None else [R] * B
    Z_b = num_groups.tolist() if isinstance(num_groups, torch.Tensor) else [num_groups] * B
    Z = max_groups if max_groups is not None else max(Z_b, default=0)
    merged = h.new_zeros(B, Z, d)
    group = torch.full((B, R), -1, dtype=torch.long)
    counts = torch.zeros(B, Z, dtype=torch.int32)
    for b in range(B):
        if n[b] and Z_b[b]:
            merged[b, :Z_b[b]], group[b, :n[b]], counts[b, :Z_b[b]] = (
                x[0] for x in group_merge(h[b:b + 1, :n[b]], Z_b[b]))
    return merged, group, counts
