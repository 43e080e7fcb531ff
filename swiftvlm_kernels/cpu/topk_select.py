import torch


def topk_select(scores, k, lengths=None, max_k=None):
    """(keep int64 [B, k], rest int64 [B, N - k]), both ascending: python_ref.topk_select's result.

    One stable ascending sort of 0 - score ranks the scores best first: 0 - x turns -0.0 and +0.0 into
    +0.0 (they tie), NaN stays NaN and sorts last (NaN ranks below -inf), and equal scores keep index
    order (ties: lower index first). The best k and the others are then each sorted by index.
    """
    if isinstance(k, torch.Tensor) or lengths is not None:
        return _ragged(scores, k, lengths, max_k)
    ranked = torch.sort(0.0 - scores.float(), dim=1, stable=True).indices
    return ranked[:, :k].sort(dim=1).values, ranked[:, k:].sort(dim=1).values


def _ragged(scores, k, lengths, max_k):
    """Ragged rows (python_ref's padded layout): each row's own leading entries ranked alone, the
    indices padded with -1."""
    B, N = scores.shape
    n = lengths.tolist() if lengths is not None else [N] * B
    kb = k.tolist() if isinstance(k, torch.Tensor) else [k] * B
    width = max_k if max_k is not None else max(kb, default=0)
    keep = torch.full((B, width), -1, dtype=torch.long)
    rest = torch.full((B, N), -1, dtype=torch.long)
    for b in range(B):
        keep_b, rest_b = topk_select(scores[b:b + 1, :n[b]], kb[b])
        keep[b, :kb[b]], rest[b, :n[b] - kb[b]] = keep_b[0], rest_b[0]
    return keep, rest
