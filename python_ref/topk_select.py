import torch


def topk_select(scores, k, lengths=None, max_k=None):
    """Split indices 0..N-1 into the k best-scored (keep) and the others (rest), both ascending.

    Order: larger score first; NaN below -inf; equal scores (including -0.0 and +0.0) -> lower index
    first. keep: int64 [B, k], rest: int64 [B, N - k], each sorted by index (position order).

    Ragged batches: k may be an integer tensor [B], and `lengths` [B] (default N each) says how many
    leading entries of each row are scores (the rest is padding, never selected). keep is then
    [B, max_k] (default: the largest k) and rest [B, N]: each row's indices ascending, then -1.
    """
    x = scores.float()
    B, N = x.shape
    is_nan = torch.isnan(x)
    value = torch.where(is_nan, torch.full_like(x, float("-inf")), x)
    # Lexicographic order via stable sorts: first the tie-breakers (non-NaN before NaN, then scores
    # before padding), then the value descending; stability keeps lower indices first among equals.
    order = torch.sort(is_nan.to(torch.uint8), dim=1, stable=True).indices
    by_value = torch.sort(torch.gather(value, 1, order), dim=1, descending=True, stable=True).indices
    ranked = torch.gather(order, 1, by_value)  # indices, best first
    if not isinstance(k, torch.Tensor) and lengths is None:
        keep = torch.sort(ranked[:, :k], dim=1).values
        rest = torch.sort(ranked[:, k:], dim=1).values
        return keep, rest
    from .tv_score import padded_width

    pos = torch.arange(N, device=x.device)
    k_t = k.to(device=x.device, dtype=torch.long) if isinstance(k, torch.Tensor) else torch.full((B,), k, device=x.device)
    valid_len = lengths.to(device=x.device, dtype=torch.long) if lengths is not None else torch.full((B,), N, device=x.device)
    padding = torch.gather(pos[None, :] >= valid_len[:, None], 1, ranked)
    ranked = torch.gather(ranked, 1, torch.sort(padding.to(torch.uint8), dim=1, stable=True).indices)
    rank = torch.empty_like(ranked).scatter_(1, ranked, pos.expand(B, N).contiguous())  # rank of each index
    valid = pos[None, :] < valid_len[:, None]
    kept = rank < k_t[:, None]
    width = padded_width(k_t, max_k) if isinstance(k, torch.Tensor) else k
    sentinel = torch.full_like(ranked, N)
    keep = torch.sort(torch.where(kept, pos, sentinel), dim=1).values[:, :width]
    rest = torch.sort(torch.where(valid & ~kept, pos, sentinel), dim=1).values
    return keep.masked_fill(keep == N, -1), rest.masked_fill(rest == N, -1)
