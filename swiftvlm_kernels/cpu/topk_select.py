import torch

import python_ref


def topk_select(scores, k, lengths=None, max_k=None):
    """(keep int64 [B, k], rest int64 [B, N - k]), both ascending: python_ref.topk_select's result.

    One stable ascending sort of 0 - score ranks the scores best first: 0 - x turns -0.0 and +0.0 into
    +0.0 (they tie), NaN stays NaN and sorts last (NaN ranks below -inf), and equal scores keep index
    order (ties: lower index first). The best k and the others are then each sorted by index.
    """
    if isinstance(k, torch.Tensor) or lengths is not None:  # ragged rows: the reference's masked ranking
        return python_ref.topk_select(scores, k, lengths, max_k)
    ranked = torch.sort(0.0 - scores.float(), dim=1, stable=True).indices
    return ranked[:, :k].sort(dim=1).values, ranked[:, k:].sort(dim=1).values
