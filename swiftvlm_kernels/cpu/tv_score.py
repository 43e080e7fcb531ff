import torch

from ._chunks import CHUNK_FLOATS


def tv_score(q, k, vis_start, vis_len, scale: float, key_mask=None, max_vis_len=None):
    """fp32 [B, vis_len]: python_ref.tv_score's arithmetic, with K converted to fp32 a few KV heads at
    a time (_chunks.py) and each sample's visual span sliced on the host (vis_start is a CPU tensor).
    A ragged vis_len (tensor [B]) gives [B, max_vis_len], zero past each sample's count."""
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qf = (q if q.dtype == torch.float32 else q.float()).reshape(B, Hkv, H // Hkv, D)
    if k.dtype == torch.float32:
        logits = torch.matmul(qf, k.transpose(-1, -2))  # [B, Hkv, G, L]  (Eq. 2)
    else:
        step = max(1, CHUNK_FLOATS // max(1, B * L * D))
        logits = torch.cat([torch.matmul(qf[:, h:h + step], k[:, h:h + step].float().transpose(-1, -2))
                            for h in range(0, Hkv, step)], 1)
    logits = logits * scale
    probs = None
    if key_mask is not None:
        logits = logits.masked_fill_(key_mask.logical_not().view(B, 1, 1, L), float("-inf"))
        if not bool(key_mask.any(-1).all()):  # a sample without a valid key scores 0, as the reference
            probs = torch.where(key_mask.any(-1)[:, None, None, None], torch.softmax(logits, dim=-1), 0.0)
    if probs is None:
        probs = torch.softmax(logits, dim=-1)
    mean = probs.view(B, H, L).mean(dim=1)  # [B, L]
    if isinstance(vis_len, torch.Tensor):
        i = torch.arange(max_vis_len)
        pos = vis_start.to(torch.long)[:, None] + i
        inside = (pos >= 0) & (pos < L) & (i < vis_len.to(torch.long)[:, None])
        return torch.where(inside, mean.gather(1, pos.clamp(0, max(L - 1, 0))), 0.0)
    starts = vis_start.tolist()
    if B == 1 and 0 <= starts[0] <= L - vis_len:
        return mean.narrow(1, starts[0], vis_len).clone()  # a fresh tensor, as the fake one
    if vis_len == 0 or all(0 <= s <= L - vis_len for s in starts):
        return torch.stack([mean[b].narrow(0, s, vis_len) for b, s in enumerate(starts)]) if B else mean[:, :vis_len]
    # visual positions outside [0, L) score 0 (reachable only by calling the backend directly)
    pos = torch.tensor(starts)[:, None] + torch.arange(vis_len)
    inside = (pos >= 0) & (pos < L)
    return torch.where(inside, mean.gather(1, pos.clamp(0, max(L - 1, 0))), 0.0)
