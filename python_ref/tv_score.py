import torch


def tv_score(q, k, vis_start, vis_len: int, scale: float, key_mask=None):
    """Text-to-visual attention score of the last token (Eq. 1-2, last row of the attention matrix).

    q: [B, H, D] last-token query after RoPE; k: [B, Hkv, L, D] keys after RoPE; query head h reads
    key head h // (H // Hkv). vis_start: integer [B]; key_mask: bool [B, L] (True = valid) or None.
    Returns fp32 [B, vis_len]: the mean over the H heads of softmax_j(scale * <q_h, k_j>) over all
    valid keys j, read at keys vis_start[b] + i. A sample with no valid key scores 0 everywhere;
    visual positions outside [0, L) score 0. NaN or inf in q or k gives what torch.softmax gives: a
    head with a NaN or +inf logit (or only -inf logits) has NaN probabilities, so the sample's scores
    are NaN.
    """
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    # Group the query heads by their KV head, so keys are never repeated (GQA).
    qf = q.float().reshape(B, Hkv, G, D)
    logits = torch.matmul(qf, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G, L]  (Eq. 2)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if key_mask is not None:  # a sample without a valid key: softmax of all -inf is NaN; it scores 0
        probs = torch.where(key_mask.any(-1)[:, None, None, None], probs, 0.0)
    mean = probs.reshape(B, H, L).mean(dim=1)  # [B, L]
    pos = vis_start.to(torch.long)[:, None] + torch.arange(vis_len, device=q.device)
    inside = (pos >= 0) & (pos < L)
    scores = torch.gather(mean, 1, pos.clamp(0, max(L - 1, 0)))
    return torch.where(inside, scores, torch.zeros_like(scores))
