import torch


def tv_score(q, k, vis_start, vis_len, scale: float, key_mask=None, max_vis_len=None):
    """Text-to-visual attention score of the last token (Eq. 1-2, last row of the attention matrix).

    q: [B, H, D] last-token query after RoPE; k: [B, Hkv, L, D] keys after RoPE; query head h reads
    key head h // (H // Hkv). vis_start: integer [B]; key_mask: bool [B, L] (True = valid) or None.
    Returns fp32 [B, vis_len]: the mean over the H heads of softmax_j(scale * <q_h, k_j>) over all
    valid keys j, read at keys vis_start[b] + i. A sample with no valid key scores 0 everywhere;
    visual positions outside [0, L) score 0. NaN or inf in q or k gives what torch.softmax gives: a
    head with a NaN or +inf logit (or only -inf logits) has NaN probabilities, so the sample's scores
    are NaN.

    Ragged batches: vis_len may be an integer tensor [B] (each sample's visual count); the result is
    then [B, max_vis_len] (default: the largest count) and row b scores 0 from vis_len[b] on.
    """
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    ragged = isinstance(vis_len, torch.Tensor)
    width = padded_width(vis_len, max_vis_len) if ragged else vis_len
    # Group the query heads by their KV head, so keys are never repeated (GQA).
    qf = q.float().reshape(B, Hkv, G, D)
    logits = torch.matmul(qf, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G, L]  (Eq. 2)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if key_mask is not None:  # a sample without a valid key: softmax of all -inf is NaN; it scores 0
        probs = torch.where(key_mask.any(-1)[:, None, None, None], probs, 0.0)
    mean = probs.reshape(B, H, L).mean(dim=1)  # [B, L]
    i = torch.arange(width, device=q.device)
    pos = vis_start.to(torch.long)[:, None] + i
    inside = (pos >= 0) & (pos < L)
    if ragged:
        inside = inside & (i < vis_len.to(device=q.device, dtype=torch.long)[:, None])
    scores = torch.gather(mean, 1, pos.clamp(0, max(L - 1, 0)))
    return torch.where(inside, scores, torch.zeros_like(scores))


def padded_width(counts, given):
    """The padded width of a ragged output: `given`, else the largest count (0 for an empty batch)."""
    if given is not None:
        return given
    return int(counts.max()) if counts.numel() else 0
