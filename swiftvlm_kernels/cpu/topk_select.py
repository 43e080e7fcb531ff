import torch


def topk_select(scores, k: int):
    """(keep int64 [B, k], rest int64 [B, N - k]), both ascending: python_ref.topk_select's result.

    Each score becomes one int64 key that orders exactly as the reference: the score's
    order-preserving 32-bit image (NaN lowest, -0.0 == +0.0) in the high half, N - 1 - index in
    the low half (ties: lower index first). One top-k finds the kept set; one stable sort of the
    kept flags lists the rest, then the kept, each in index order.
    """
    B, N = scores.shape
    x = scores.float() + 0.0  # -0.0 + 0.0 = +0.0: the two zeros tie
    bits = x.view(torch.int32).to(torch.int64)
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negatives: larger magnitude, lower key
    order = torch.where(torch.isnan(x), -(1 << 31), order)  # NaN below -inf
    key = (order << 32) + torch.arange(N - 1, -1, -1)
    kept = torch.zeros(B, N, dtype=torch.uint8).scatter_(1, torch.topk(key, k, dim=1, sorted=False).indices, 1)
    both = torch.sort(kept, dim=1, stable=True).indices  # rest (0) first, then keep, each ascending
    return both[:, N - k:].clone(), both[:, :N - k].clone()  # fresh, contiguous, as the fake outputs
