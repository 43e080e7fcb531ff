"""group_merge: assign each rest token to its most similar group target, then average each group.

Two launches, deterministic (no atomics; a fixed summation order, so equal input gives bit-equal
output on every run):
  1. _assign_kernel, grid (B, cdiv(R, BLOCK_R)): cosine similarity of a tile of tokens to all Z
     targets t_z = floor(z * R / Z) in fp64, rounded once to fp32 as the reference does (scale-safe,
     and exact ties such as parallel vectors go to the lowest z on every backend), argmax with ties
     to the lowest z and NaN lowest; a target always joins its own group.
  2. _group_mean_kernel, grid (B * Z, cdiv(d, BLOCK_D)): one program per group and feature block
     sums the group's members in index order in fp32 and divides by their count.
"""
import torch
import triton
import triton.language as tl

from ._common import cast_rne, on_device, pow2


@triton.jit
def _assign_kernel(h_ptr, group_ptr, R, Z, d, stride_hb, stride_hr, stride_hd,
                   BLOCK_R: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    h_base = h_ptr + b * stride_hb
    dd = tl.arange(0, BLOCK_D)

    best = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    best_z = tl.zeros([BLOCK_R], dtype=tl.int32)
    for z0 in range(0, Z, BLOCK_Z):
        z = z0 + tl.arange(0, BLOCK_Z)
        z_ok = z < Z
        target = (z.to(tl.int64) * R) // Z
        dots = tl.zeros([BLOCK_R, BLOCK_Z], dtype=tl.float64)
        token_sq = tl.zeros([BLOCK_R], dtype=tl.float64)
        target_sq = tl.zeros([BLOCK_Z], dtype=tl.float64)
        for d0 in range(0, d, BLOCK_D):
            col = d0 + dd
            col_ok = col < d
            x = tl.load(h_base + r[:, None] * stride_hr + col[None, :] * stride_hd,
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float64)
            t = tl.load(h_base + target[:, None] * stride_hr + col[None, :] * stride_hd,
                        mask=z_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float64)
            dots += tl.dot(x, tl.trans(t))
            token_sq += tl.sum(x * x, axis=1)
            target_sq += tl.sum(t * t, axis=1)
        inv_token = 1.0 / tl.maximum(tl.sqrt(token_sq), 1e-300)
        inv_target = 1.0 / tl.maximum(tl.sqrt(target_sq), 1e-300)
        sim = (dots * inv_token[:, None] * inv_target[None, :]).to(tl.float32)  # Eq. 10: cosine, fp64 -> fp32
        sim = tl.where(z_ok[None, :] & (sim == sim), sim, float("-inf"))  # NaN ranks lowest
        chunk_best = tl.max(sim, axis=1)
        chunk_z = z0 + tl.argmax(sim, axis=1, tie_break_left=True)
        better = chunk_best > best  # strict: an earlier (lower) z keeps a tie
        best_z = tl.where(better, chunk_z, best_z)
        best = tl.where(better, chunk_best, best)

    # token r is the target of group ceil(r * Z / R) when floor of that z * R / Z gives r back
    own = (r.to(tl.int64) * Z + R - 1) // R
    is_target = (own < Z) & ((own * R) // Z == r)
    group = tl.where(is_target, own, best_z.to(tl.int64))
    tl.store(group_ptr + b * R + r, group, mask=r_ok)


@triton.jit
def _group_mean_kernel(h_ptr, group_ptr, merged_ptr, counts_ptr, R, Z, d,
                       stride_hb, stride_hr, stride_hd,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    b = pid // Z
    z = pid % Z
    col = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = col < d
    h_base = h_ptr + b * stride_hb

    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    members = tl.zeros([BLOCK_R], dtype=tl.int32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        is_member = tl.load(group_ptr + b * R + r, mask=r < R, other=-1) == z
        x = tl.load(h_base + r[:, None] * stride_hr + col[None, :] * stride_hd,
                    mask=is_member[:, None] & col_ok[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=0)
        members += is_member.to(tl.int32)
    count = tl.sum(members, axis=0)
    mean = total / tl.maximum(count, 1).to(tl.float32)  # Eq. 11
    tl.store(merged_ptr + pid * d + col, cast_rne(mean, merged_ptr.dtype.element_ty), mask=col_ok)
    tl.store(counts_ptr + pid, count, mask=d_block == 0)


def group_merge(h, num_groups: int):
    """(merged h.dtype [B, Z, d], group int64 [B, R], counts int32 [B, Z]) (Eq. 10-11).

    h: [B, R, d], 1 <= Z <= R, read in place through its strides (no copy). Two launches: grid
    (B, cdiv(R, BLOCK_R)) assigns groups, grid (B * Z, cdiv(d, BLOCK_D)) averages them.
    Deterministic: no atomics, the members of a group are summed in index order.
    """
    B, R, d = h.shape
    Z = num_groups
    merged = torch.empty(B, Z, d, dtype=h.dtype, device=h.device)
    group = torch.empty(B, R, dtype=torch.int64, device=h.device)
    counts = torch.empty(B, Z, dtype=torch.int32, device=h.device)
    if B == 0:
        return merged, group, counts
    block_r = 16  # small token tiles: more programs for the few hundred rest tokens of one image
    block_z = min(max(pow2(Z), 16), 64)  # tl.dot needs every tile dimension >= 16
    block_d = 1024 // block_z  # a [BLOCK_Z, BLOCK_D] fp64 target tile of 8 KiB keeps ~128 registers
    block_dm = min(pow2(d), 256)
    with on_device(h):
        _assign_kernel[(B, triton.cdiv(R, block_r))](
            h, group, R, Z, d, *h.stride(),
            BLOCK_R=block_r, BLOCK_Z=block_z, BLOCK_D=block_d, num_warps=8)
        _group_mean_kernel[(B * Z, max(1, triton.cdiv(d, block_dm)))](  # d = 0 still writes the counts
            h, group, merged, counts, R, Z, d, *h.stride(),
            BLOCK_R=32, BLOCK_D=block_dm, num_warps=4)
    return merged, group, counts
