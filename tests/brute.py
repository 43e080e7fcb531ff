"""Brute-force formulas for the ops, written as directly as possible (loops, float64), to test
python_ref against. Slow on purpose; small shapes only."""
import math

import torch


def tv_score(q, k, vis_start, vis_len, scale, key_mask=None):
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    out = torch.zeros(B, vis_len, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = k[b, h // (H // Hkv)].double()  # [L, D]
            logits = (kh @ q[b, h].double()) * scale  # explicit row of the attention matrix
            valid = [j for j in range(L) if key_mask is None or bool(key_mask[b, j])]
            if not valid:
                continue
            m = max(float(logits[j]) for j in valid)
            denom = sum(math.exp(float(logits[j]) - m) for j in valid)
            for i in range(vis_len):
                j = int(vis_start[b]) + i
                if j in valid:
                    out[b, i] += math.exp(float(logits[j]) - m) / denom / H
    return out


def rank_key(value, index):
    """Sort key, best first: larger value, NaN below -inf, lower index on ties."""
    if math.isnan(value):
        return (1, 0.0, index)
    return (0, -value, index)


def topk_select(scores, k):
    keeps, rests = [], []
    for row in scores.double().tolist():
        ranked = sorted(range(len(row)), key=lambda i: rank_key(row[i], i))
        keeps.append(sorted(ranked[:k]))
        rests.append(sorted(ranked[k:]))
    return torch.tensor(keeps, dtype=torch.int64).reshape(len(keeps), k), torch.tensor(
        rests, dtype=torch.int64).reshape(len(rests), scores.shape[1] - k)


def cosine(a, b):
    na, nb = max(a.norm().item(), 1e-12), max(b.norm().item(), 1e-12)
    return float((a @ b) / (na * nb))


def group_merge(h, Z):
    B, R, d = h.shape
    targets = [z * R // Z for z in range(Z)]
    groups = torch.zeros(B, R, dtype=torch.int64)
    merged = torch.zeros(B, Z, d, dtype=torch.float64)
    counts = torch.zeros(B, Z, dtype=torch.int32)
    for b in range(B):
        hb = h[b].double()
        for i in range(R):
            if i in targets:
                g = targets.index(i)
            else:
                sims = [cosine(hb[i], hb[t]) for t in targets]
                sims = [-math.inf if math.isnan(s) else s for s in sims]
                g = max(range(Z), key=lambda z: (sims[z], -z))
            groups[b, i] = g
        for z in range(Z):
            members = [i for i in range(R) if groups[b, i] == z]
            counts[b, z] = len(members)
            merged[b, z] = sum(hb[i] for i in members) / len(members)
    return merged, groups, counts


def bypass_align(h_rest, group, merged_now, merged_then):
    B, R, d = h_rest.shape
    out = torch.zeros(B, R, d, dtype=torch.float64)
    for b in range(B):
        for i in range(R):
            g = int(group[b, i])
            out[b, i] = h_rest[b, i].double() + merged_now[b, g].double() - merged_then[b, g].double()
    return out


def compact(h, vis_start, keep_idx, rest_idx, Z):
    """python_ref.compact, token by token: walk the input rows in order and place each one."""
    B, n, d = h.shape
    k, R = keep_idx.shape[1], rest_idx.shape[1]
    M = k + R
    targets = [z * R // Z for z in range(Z)]
    n_new = n - M + k + Z
    h_new = torch.zeros(B, n_new, d, dtype=h.dtype)
    src = torch.zeros(B, n_new, dtype=torch.int64)
    rest_h = torch.zeros(B, R, d, dtype=h.dtype)
    merged_rows = torch.zeros(B, Z, dtype=torch.int64)
    inverse = torch.full((B, n), -1, dtype=torch.int64)
    for b in range(B):
        start = int(vis_start[b])
        kept = set(keep_idx[b].tolist())
        rest = rest_idx[b].tolist()
        j = 0
        for r in range(n):
            slot = r - start
            inside = 0 <= slot < M
            survives = not inside or slot in kept or (slot in rest and rest.index(slot) in targets)
            if inside and slot in rest:
                rest_h[b, rest.index(slot)] = h[b, r]
                if rest.index(slot) in targets:
                    merged_rows[b, targets.index(rest.index(slot))] = b * n_new + j
            if survives:
                h_new[b, j] = h[b, r]
                src[b, j] = b * n + r
                if not inside or slot in kept:
                    inverse[b, r] = b * n_new + j
                j += 1
        assert j == n_new
    return h_new, src, rest_h, merged_rows, inverse


def restore(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then):
    """python_ref.restore row by row, float64 (Z = 0: each rest token as it was set aside)."""
    B, n_cur, d = h.shape
    n = inverse.shape[1]
    flat = h.reshape(B * n_cur, d).double()
    out = torch.zeros(B, n, d, dtype=torch.float64)
    for b in range(B):
        for r in range(n):
            if int(inverse[b, r]) >= 0:
                out[b, r] = flat[int(inverse[b, r])]
        for i in range(rest_idx.shape[1]):
            if merged_then.shape[1] == 0:  # nothing merged: group is not read
                out[b, int(vis_start[b]) + int(rest_idx[b, i])] = h_rest[b, i].double()
                continue
            g = int(group[b, i])
            out[b, int(vis_start[b]) + int(rest_idx[b, i])] = (
                h_rest[b, i].double() + flat[int(merged_rows[b, g])] - merged_then[b, g].double())
    return out


def attention_importance(q, k, vis_start, vis_len, scale, key_mask=None):
    """Token by token in float64: per head, each valid row's causal softmax over its valid keys; per
    visual key, the mean over heads and valid text (visual) rows of its probability."""
    q, k = q.double(), k.double()
    B, H, L, _ = q.shape
    G = H // k.shape[1]
    counts = vis_len.tolist() if isinstance(vis_len, torch.Tensor) else [vis_len] * B
    width = max(counts, default=0)
    t2v, v2v = torch.zeros(B, width, dtype=torch.float64), torch.zeros(B, width, dtype=torch.float64)
    for b in range(B):
        valid = [True] * L if key_mask is None else key_mask[b].tolist()
        start, n = int(vis_start[b]), counts[b]
        visual = set(range(start, start + n))
        text_rows = [j for j in range(L) if valid[j] and j not in visual]
        visual_rows = [j for j in range(L) if valid[j] and j in visual]
        for h in range(H):
            for rows, out in ((text_rows, t2v), (visual_rows, v2v)):
                for j in rows:
                    keys = [m for m in range(j + 1) if valid[m]]
                    logits = torch.stack([scale * (q[b, h, j] @ k[b, h // G, m]) for m in keys])
                    p = torch.softmax(logits, 0)
                    for m, pm in zip(keys, p):
                        if start <= m < start + n:
                            out[b, m - start] += pm / (H * len(rows))
    return t2v, v2v


def attention_importance_fp64(q, k, vis_start, vis_len, scale, key_mask=None, max_vis_len=None):
    """attention_importance in float64, dense ([B, H, L, L]) but written out directly: the exact values
    the kernels' fp32 results are measured against at shapes too large for the loops above (the loops
    check this function). Ragged: vis_len an int tensor [B], results [B, max_vis_len]."""
    q, k = q.double(), k.double()
    B, H, L, _ = q.shape
    G = H // k.shape[1]
    counts = vis_len.tolist() if isinstance(vis_len, torch.Tensor) else [vis_len] * B
    width = max_vis_len if max_vis_len is not None else max(counts, default=0)
    t2v, v2v = torch.zeros(B, width, dtype=torch.float64), torch.zeros(B, width, dtype=torch.float64)
    rows = torch.arange(L)
    for b in range(B):
        valid = torch.ones(L, dtype=torch.bool) if key_mask is None else key_mask[b].bool().cpu()
        start, n = int(vis_start[b]), int(counts[b])
        visual = (rows >= start) & (rows < start + n)
        allowed = (rows[None, :] <= rows[:, None]) & valid[None, :]  # [row, key]
        logits = (q[b] @ k[b].repeat_interleave(G, 0).transpose(-1, -2)) * scale  # [H, L, L]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        probs = probs * allowed.any(-1)[None, :, None]  # a row without a key: no probabilities
        for kind, out in ((valid & ~visual, t2v), (valid & visual, v2v)):
            if kind.any():
                per_key = probs[:, kind].sum((0, 1)) / (H * int(kind.sum()))
                for i in range(min(n, width)):
                    if 0 <= start + i < L:
                        out[b, i] = per_key[start + i]
    return t2v, v2v
