import torch


def topk_select(scores, k: int):
    """(keep int64 [B, k], rest int64 [B, N - k]), both ascending: python_ref.topk_select's result.

    One stable descending sort ranks the scores (equal scores keep index order, and adding +0.0 makes
    -0.0 tie +0.0); a stable sort of the kept flags then lists the rest, then the kept, each in index
    order. A row with NaN (which must rank below -inf) takes the exact 64-bit key path instead.
    """
    x = scores.float() + 0.0
    if bool(torch.isnan(x).any()):  # a CPU tensor: reading it is free
        ranked = _ranked_with_nan(x)
    else:
        ranked = torch.sort(x, dim=1, descending=True, stable=True).indices
    B, N = x.shape
    kept = torch.zeros(B, N, dtype=torch.uint8).scatter_(1, ranked[:, :k], 1)
    both = torch.sort(kept, dim=1, stable=True).indices  # rest (0) first, then keep, each ascending
    return both[:, N - k:].clone(), both[:, :N - k].clone()  # fresh, contiguous, as the fake outputs


def _ranked_with_nan(x):
    """Indices best first: each score as one int64 key, its order-preserving 32-bit image (NaN lowest)
    in the high half and N - 1 - index in the low half (ties: lower index first)."""
    N = x.shape[1]
    bits = x.view(torch.int32).to(torch.int64)
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negatives: larger magnitude, lower key
    order = torch.where(torch.isnan(x), -(1 << 31), order)
    return torch.sort((order << 32) + torch.arange(N - 1, -1, -1), dim=1, descending=True).indices
