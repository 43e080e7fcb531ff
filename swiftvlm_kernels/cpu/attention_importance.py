"""attention_importance on CPU tensors: python_ref's arithmetic a block of query rows at a time, so
memory stays O(B H rows L) for one block instead of [B, H, L, L]; the blocks' per-key sums are added
in row order (results equal python_ref's within fp32 rounding)."""
import torch

from python_ref.attention_importance import causal_allowed, output_width, row_kinds, visual_means

BLOCK_BYTES = 64 * 2 ** 20  # the fp32 logits of one block of rows


def attention_importance(q, k, vis_start, vis_len, scale: float, key_mask=None, max_vis_len=None):
    B, H, L, E = q.shape
    Hk = k.shape[1]
    rows = row_kinds(q, vis_start, vis_len, key_mask)
    kf = k.float()[:, :, None].transpose(-1, -2)  # [B, Hk, 1, E, L]
    per_key_text = torch.zeros(B, L, device=q.device)
    per_key_visual = torch.zeros(B, L, device=q.device)
    block = max(1, BLOCK_BYTES // max(1, 4 * B * H * L))
    for r0 in range(0, L, block):
        r1 = min(L, r0 + block)
        logits = torch.matmul(q[:, :, r0:r1].float().reshape(B, Hk, H // Hk, r1 - r0, E), kf) * scale
        allowed = causal_allowed(rows.valid, r0, r1)  # [B, rows, L]
        probs = torch.softmax(logits.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1)
        probs = torch.where(allowed.any(-1)[:, None, None, :, None], probs, 0.0).reshape(B, H, r1 - r0, L).sum(1)
        per_key_text += torch.einsum("bj,bjm->bm", rows.text[:, r0:r1], probs)
        per_key_visual += torch.einsum("bj,bjm->bm", rows.visual[:, r0:r1], probs)
    return visual_means(per_key_text, per_key_visual, rows, H, output_width(vis_len, max_vis_len))
