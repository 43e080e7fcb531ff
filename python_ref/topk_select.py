import torch


def topk_select(scores, k: int):
    """Split indices 0..N-1 into the k best-scored (keep) and the others (rest), both ascending.

    Order: larger score first; NaN below -inf; equal scores (including -0.0 and +0.0) -> lower index
    first. keep: int64 [B, k], rest: int64 [B, N - k], each sorted by index (position order).
    """
    x = scores.float()
    is_nan = torch.isnan(x)
    value = torch.where(is_nan, torch.full_like(x, float("-inf")), x)
    # Lexicographic order via two stable sorts: first the tie-breaker (non-NaN before NaN), then the
    # value descending; stability keeps lower indices first among equal keys.
    order = torch.sort(is_nan.to(torch.uint8), dim=1, stable=True).indices
    by_value = torch.sort(torch.gather(value, 1, order), dim=1, descending=True, stable=True).indices
    ranked = torch.gather(order, 1, by_value)  # indices, best first
    keep = torch.sort(ranked[:, :k], dim=1).values
    rest = torch.sort(ranked[:, k:], dim=1).values
    return keep, rest
