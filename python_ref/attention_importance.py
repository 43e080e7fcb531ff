from typing import NamedTuple

import torch

from .tv_score import padded_width


def attention_importance(q, k, vis_start, vis_len, scale: float, key_mask=None, max_vis_len=None):
    """How much attention each visual token receives from the text rows and from the visual rows
    (ALVTS' importance; docs/semantics.md, attention_importance).

    q: [B, H, L, E] queries of every row, k: [B, Hk, L, E] keys of every row (E any width: a low-rank
    selector's rank or the model's head dim; query head h reads key head h // (H // Hk)).
    vis_start: integer [B]; key_mask: bool [B, L] (True = a valid row: it is a valid key, and a valid
    query row) or None.

    Per head, row j's probabilities are the causal softmax over the valid keys m <= j of
    scale * <q_j, k_m>. Returns (t2v, v2v), fp32 [B, vis_len] each: at visual token i (key vis_start[b]
    + i), the mean over the H heads and over the sample's valid text rows (t2v) or valid visual rows
    (v2v) of that probability. A sample without a valid text (visual) row has t2v (v2v) 0; visual
    positions outside [0, L) are 0. Materialises [B, H, L, L] (this is the reference); the kernels
    never do.

    Ragged batches: vis_len may be an integer tensor [B]; the results are then [B, max_vis_len]
    (default: the largest count) and row b is 0 from vis_len[b] on (its visual rows are its own span).
    """
    B, H, L, E = q.shape
    Hk = k.shape[1]
    rows = row_kinds(q, vis_start, vis_len, key_mask)
    qf = q.float().reshape(B, Hk, H // Hk, L, E)
    logits = torch.matmul(qf, k.float()[:, :, None].transpose(-1, -2)) * scale  # [B, Hk, G, L, L]
    allowed = causal_allowed(rows.valid, 0, L)  # [B, L (row), L (key)]
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(allowed.any(-1)[:, None, None, :, None], probs, 0.0)  # a row without keys: 0
    probs = probs.reshape(B, H, L, L).sum(1)  # summed over heads: [B, row, key]
    per_key_text = torch.einsum("bj,bjm->bm", rows.text, probs)  # [B, key]
    per_key_visual = torch.einsum("bj,bjm->bm", rows.visual, probs)
    return visual_means(per_key_text, per_key_visual, rows, H, output_width(vis_len, max_vis_len))


class RowKinds(NamedTuple):
    valid: torch.Tensor   # bool [B, L]: valid rows (and keys)
    text: torch.Tensor    # fp32 [B, L]: 1 at the valid text rows
    visual: torch.Tensor  # fp32 [B, L]: 1 at the valid visual rows
    start: torch.Tensor   # int64 [B]
    counts: torch.Tensor  # int64 [B]: visual tokens per sample
    ragged: bool


def row_kinds(q, vis_start, vis_len, key_mask) -> RowKinds:
    """Which rows are valid, text and visual (shared with the cpu backend)."""
    B, _, L, _ = q.shape
    device = q.device
    ragged = isinstance(vis_len, torch.Tensor)
    counts = vis_len.to(device=device, dtype=torch.long) if ragged else torch.full((B,), vis_len, device=device)
    valid = torch.ones(B, L, dtype=torch.bool, device=device) if key_mask is None else key_mask
    start = vis_start.to(device=device, dtype=torch.long)
    rows = torch.arange(L, device=device)
    visual = (rows[None, :] >= start[:, None]) & (rows[None, :] < (start + counts)[:, None])
    return RowKinds(valid, (valid & ~visual).float(), (valid & visual).float(), start, counts, ragged)


def causal_allowed(valid, r0: int, r1: int):
    """bool [B, r1 - r0, L]: row j may attend key m (m <= j, m valid)."""
    L = valid.shape[1]
    rows = torch.arange(L, device=valid.device)
    return (rows[None, :] <= rows[r0:r1, None])[None] & valid[:, None, :]


def output_width(vis_len, max_vis_len) -> int:
    return padded_width(vis_len, max_vis_len) if isinstance(vis_len, torch.Tensor) else vis_len


def visual_means(per_key_text, per_key_visual, rows: RowKinds, H: int, width: int):
    """(t2v, v2v) [B, width] at the visual keys from the head- and row-summed probabilities per key
    [B, L]."""
    L = per_key_text.shape[1]
    n_text, n_visual = rows.text.sum(1), rows.visual.sum(1)
    t2v = torch.where(n_text[:, None] > 0, per_key_text / (H * n_text.clamp_min(1))[:, None], 0.0)
    v2v = torch.where(n_visual[:, None] > 0, per_key_visual / (H * n_visual.clamp_min(1))[:, None], 0.0)
    i = torch.arange(width, device=per_key_text.device)
    pos = rows.start[:, None] + i
    inside = (pos >= 0) & (pos < L) & (i < rows.counts[:, None])
    at = pos.clamp(0, max(L - 1, 0))
    return torch.where(inside, torch.gather(t2v, 1, at), 0.0), torch.where(inside, torch.gather(v2v, 1, at), 0.0)
