"""group_merge: assign each rest token to its most similar group target, then average each group.

Three launches, deterministic (no atomics; a fixed summation order, so equal input gives bit-equal
output on every run), nothing that must start at zero:
  1. _group_assign_kernel, grid (cdiv(Z, BLOCK_Z), cdiv(R, BLOCK_R), B), target tile fastest so the
     programs in flight share their token tile in L2: one tile of BLOCK_R tokens x BLOCK_Z targets
     t_z = floor(z * R / Z), tl.dot over d in fp64 with the token and target norms summed from the
     same loaded tiles (once per tile, not per pair); cosine in fp64 rounded once to fp32 as the
     reference does (scale-safe, and exact ties such as parallel vectors go to the lowest z on every
     backend), NaN lowest; each token's best target of the tile (ties to the lowest z) is written as
     a candidate (fp32 similarity, int32 z). The tile shape is the one of (64, 64), (32, 32),
     (16, 16) that the time model of _pick_tile rates fastest. Reads h once from DRAM (the re-reads
     of the target rows and of a token tile across target tiles hit L2); R Z d fp64 FMAs.
  2. _group_sort_kernel, grid (cdiv(R, SEG), B): the best candidate of every token of a segment of SEG
     tokens (a target keeps its own group) -> group; then the segment sorted by (group, index) with
     tl.sort -> its member indices in that order, and lower[b, s, z] = the number of the segment's
     tokens with a group below z, z = 0..Z, so group z's members in segment s lie at
     [lower[b, s, z], lower[b, s, z + 1]).
  3. _group_mean_kernel, grid (B * Z, cdiv(d, BLOCK_D)): prefix sums of the group's per-segment
     counts locate its members, gathered in ascending index order; their rows are added one after
     another in fp32 (exactly the reference's scatter_add order) and divided by the count with IEEE
     division (Eq. 11). Reads only the members' rows.
Ragged batches (num_groups an int tensor [B] of Z_b, lengths [B] rows R_b, widths R and max_groups):
the same launches over the padded widths, every program with its sample's R_b and Z_b (targets
floor(z R_b / Z_b)); group -1 past R_b, merged and counts 0 past Z_b (such groups have no member).
"""
import torch
import triton
import triton.language as tl

from ._common import cast_rne, on_device, pow2

TILES = ((64, 64), (32, 32), (16, 16))  # (BLOCK_R, BLOCK_Z) of _group_assign_kernel; tl.dot needs >= 16
SEG = 256  # tokens per sort segment
_OLD_TRITON = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)
_tile_override = None  # tests set a (BLOCK_R, BLOCK_Z) of TILES to run that tile shape


def _pick_tile(B, R, Z):
    """The tile shape the time model rates fastest: programs run in waves of one per SM (132, an
    H100) and each costs BLOCK_R * BLOCK_Z * d FMAs plus about 2 * (BLOCK_R + BLOCK_Z) * d for loading
    the rows and their norms; the first (largest) tile wins ties."""
    if _tile_override is not None:
        return _tile_override
    best, best_cost = None, None
    for block_r, block_z in TILES:
        programs = B * triton.cdiv(R, block_r) * triton.cdiv(Z, block_z)
        cost = triton.cdiv(programs, 132) * (block_r * block_z + 2 * (block_r + block_z))
        if best_cost is None or cost < best_cost:
            best, best_cost = (block_r, block_z), cost
    return best


@triton.jit
def _sample_counts(len_ptr, zb_ptr, b, R, Z, RAGGED: tl.constexpr):
    """(R_b, Z_b): a ragged sample's rows and groups (clamped into the widths), else (R, Z)."""
    r_b = R + 0 * b
    z_b = Z + 0 * b
    if RAGGED:
        r_b = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int64), 0), R)
        z_b = tl.minimum(tl.maximum(tl.load(zb_ptr + b).to(tl.int64), 0), tl.minimum(Z, r_b))
    return r_b, z_b


@triton.jit
def _group_assign_kernel(h_ptr, cand_sim_ptr, cand_z_ptr, len_ptr, zb_ptr, R, Z, d, stride_hb, stride_hr, stride_hd,
                   BLOCK_R: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_D: tl.constexpr, RAGGED: tl.constexpr):
    zt = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    r_b, z_b = _sample_counts(len_ptr, zb_ptr, b, R, Z, RAGGED)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    z = zt * BLOCK_Z + tl.arange(0, BLOCK_Z)
    r_ok = r < r_b
    z_ok = z < z_b
    h_base = h_ptr + b * stride_hb
    token_row = h_base + r.to(tl.int64) * stride_hr
    target_row = h_base + ((z.to(tl.int64) * r_b) // tl.maximum(z_b, 1)) * stride_hr  # t_z = floor(z R / Z)
    dd = tl.arange(0, BLOCK_D)

    dots = tl.zeros([BLOCK_R, BLOCK_Z], dtype=tl.float64)
    token_sq = tl.zeros([BLOCK_R], dtype=tl.float64)
    target_sq = tl.zeros([BLOCK_Z], dtype=tl.float64)
    for d0 in range(0, d, BLOCK_D):
        col = d0 + dd
        col_ok = col < d
        x = tl.load(token_row[:, None] + col[None, :] * stride_hd,
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float64)
        t = tl.load(target_row[:, None] + col[None, :] * stride_hd,
                    mask=z_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float64)
        dots += tl.dot(x, tl.trans(t))
        token_sq += tl.sum(x * x, axis=1)
        target_sq += tl.sum(t * t, axis=1)
    inv_token = 1.0 / tl.maximum(tl.sqrt(token_sq), 1e-300)
    inv_target = 1.0 / tl.maximum(tl.sqrt(target_sq), 1e-300)
    sim = (dots * inv_token[:, None] * inv_target[None, :]).to(tl.float32)  # Eq. 10: cosine, fp64 -> fp32
    sim = tl.where(z_ok[None, :] & (sim == sim), sim, float("-inf"))  # NaN ranks lowest
    best = tl.max(sim, axis=1)
    best_z = zt * BLOCK_Z + tl.argmax(sim, axis=1, tie_break_left=True)  # ties: the lowest z
    at = (b * tl.num_programs(0) + zt) * R + r
    tl.store(cand_sim_ptr + at, best, mask=r_ok)
    tl.store(cand_z_ptr + at, best_z, mask=r_ok)


@triton.jit
def _group_sort_kernel(cand_sim_ptr, cand_z_ptr, group_ptr, members_ptr, lower_ptr, len_ptr, zb_ptr, R, Z,
                 num_target_tiles, num_segments, SEG: tl.constexpr, BLOCK_L: tl.constexpr, RAGGED: tl.constexpr):
    s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    r_b, z_b = _sample_counts(len_ptr, zb_ptr, b, R, Z, RAGGED)
    local = tl.arange(0, SEG)
    i = s * SEG + local
    ok = i < r_b

    best = tl.full([SEG], float("-inf"), dtype=tl.float32)
    best_z = tl.zeros([SEG], dtype=tl.int32)  # every similarity NaN: all tie at -inf, the lowest z wins
    for zt in range(0, num_target_tiles):  # ascending z: strict > keeps the lower one on ties
        at = (b * num_target_tiles + zt) * R + i
        cand = tl.load(cand_sim_ptr + at, mask=ok, other=float("-inf"))
        better = cand > best
        best_z = tl.where(better, tl.load(cand_z_ptr + at, mask=ok, other=0), best_z)
        best = tl.where(better, cand, best)
    # token i is the target of group ceil(i * Z / R) when floor of that z * R / Z gives i back
    own = (i.to(tl.int64) * z_b + r_b - 1) // tl.maximum(r_b, 1)
    is_target = (own < z_b) & ((own * r_b) // tl.maximum(z_b, 1) == i)
    group = tl.where(is_target, own, best_z.to(tl.int64))
    tl.store(group_ptr + b * R + i, tl.where(ok, group, -1), mask=i < R)  # -1 past a ragged sample's rows

    # (group, index) keys, padding after every group; sorted, they list the members group by group
    key = tl.sort(tl.where(ok, group, Z) * SEG + local)
    sorted_group = key // SEG
    tl.store(members_ptr + b * R + i, (s * SEG + key % SEG).to(tl.int32), mask=ok)
    lower_s = lower_ptr + (b * num_segments + s) * (Z + 1)
    for z0 in range(0, Z + 1, BLOCK_L):
        zz = z0 + tl.arange(0, BLOCK_L)
        below = tl.sum((sorted_group[None, :] < zz[:, None]).to(tl.int32), axis=1)
        tl.store(lower_s + zz, below, mask=zz <= Z)


@triton.jit
def _group_mean_kernel(h_ptr, members_ptr, lower_ptr, merged_ptr, counts_ptr, R, Z, d, num_segments,
                       stride_hb, stride_hr, stride_hd, SEG: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    b = pid // Z
    z = pid % Z
    col = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = col < d
    h_base = h_ptr + b * stride_hb
    m_ids = tl.arange(0, BLOCK_M)
    s_ids = tl.arange(0, BLOCK_S)

    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    count = tl.full([], 0, dtype=tl.int32)
    for s0 in range(0, num_segments, BLOCK_S):
        s = s0 + s_ids
        s_ok = s < num_segments
        lower_s = lower_ptr + (b * num_segments + s) * (Z + 1) + z
        lo = tl.load(lower_s, mask=s_ok, other=0)
        n_s = tl.load(lower_s + 1, mask=s_ok, other=0) - lo
        end = tl.cumsum(n_s, axis=0)  # members of this group in segments s0 .. s
        first = s * SEG + lo - (end - n_s)  # + p: position in members_ptr of the chunk's p-th member
        n = tl.sum(n_s, axis=0)
        for p0 in range(0, n, BLOCK_M):
            p = p0 + m_ids
            p_ok = p < n
            seg = tl.sum((end[None, :] <= p[:, None]).to(tl.int32), axis=1)  # the segment holding p
            pos = tl.sum(tl.where(seg[:, None] == s_ids[None, :], first[None, :], 0), axis=1) + p
            row = tl.load(members_ptr + b * R + pos, mask=p_ok, other=0).to(tl.int64)
            for j in tl.static_range(BLOCK_M):  # one member after another, in ascending index order
                row_j = tl.sum(tl.where(m_ids == j, row, 0), axis=0)
                member_ok = tl.zeros_like(col) + (p0 + j) < n  # as a vector: the interpreter masks with arrays
                x = tl.load(h_base + row_j * stride_hr + col * stride_hd, mask=col_ok & member_ok, other=0.0)
                total += x.to(tl.float32)
        count += n
    # count >= 1: the target t_z is always a member (Eq. 11); a ragged sample's padding group has none
    mean = tl.math.div_rn(total, tl.zeros_like(total) + tl.maximum(count, 1).to(tl.float32))
    tl.store(merged_ptr + pid * d + col, cast_rne(mean, merged_ptr.dtype.element_ty), mask=col_ok)
    tl.store(counts_ptr + pid, count, mask=d_block == 0)


def group_merge(h, num_groups, lengths=None, max_groups=None):
    """(merged h.dtype [B, Z, d], group int64 [B, R], counts int32 [B, Z]) (Eq. 10-11).

    h: [B, R, d], 1 <= Z <= R, read in place through its strides (no copy). Three launches: assign
    (token x target tiles), sort (member lists per segment of SEG tokens), mean per (group, feature
    block). Deterministic: no atomics, the members of a group are summed in index order.
    Ragged samples: num_groups an int tensor [B] (or an int) and lengths [B], Z = max_groups.
    """
    B, R, d = h.shape
    ragged = isinstance(num_groups, torch.Tensor) or lengths is not None
    if ragged:
        Z = max_groups if isinstance(num_groups, torch.Tensor) else num_groups
        zb = num_groups.contiguous() if isinstance(num_groups, torch.Tensor) else \
            torch.full((B,), num_groups, dtype=torch.int64, device=h.device)
        rb = lengths.contiguous() if lengths is not None else torch.full((B,), R, dtype=torch.int64, device=h.device)
    else:
        Z = num_groups
        zb = rb = None
    merged = torch.empty(B, Z, d, dtype=h.dtype, device=h.device)
    group = torch.empty(B, R, dtype=torch.int64, device=h.device)
    counts = torch.empty(B, Z, dtype=torch.int32, device=h.device)
    if B == 0:
        return merged, group, counts
    if ragged and (Z == 0 or R == 0):  # no sample has a group (or a row)
        return merged.zero_(), group.fill_(-1), counts.zero_()
    block_r, block_z = _pick_tile(B, R, Z)
    target_tiles = triton.cdiv(Z, block_z)
    segments = triton.cdiv(R, SEG)
    cand_sim = torch.empty(B, target_tiles, R, dtype=torch.float32, device=h.device)
    cand_z = torch.empty(B, target_tiles, R, dtype=torch.int32, device=h.device)
    members = torch.empty(B, R, dtype=torch.int32, device=h.device)
    lower = torch.empty(B, segments, Z + 1, dtype=torch.int32, device=h.device)
    block_dm = min(pow2(d), 256)
    # triton < 3.7 cannot compile an fp64 tl.dot fed by 16-bit loads ("fp64 don't support largeK MMA"):
    # there the assign kernel reads an fp32 copy of h (exact; one more pass over h)
    h_dot = h.float() if h.element_size() < 4 and _OLD_TRITON else h
    with on_device(h):
        _group_assign_kernel[(target_tiles, triton.cdiv(R, block_r), B)](
            h_dot, cand_sim, cand_z, rb if ragged else h, zb if ragged else h, R, Z, d, *h_dot.stride(),
            BLOCK_R=block_r, BLOCK_Z=block_z, BLOCK_D=1024 // block_z if block_z > 16 else 16,  # 16 x 16: no spill (triton 3.6)
            RAGGED=ragged, num_warps=8 if block_r >= 32 else 4)
        _group_sort_kernel[(segments, B)](
            cand_sim, cand_z, group, members, lower, rb if ragged else h, zb if ragged else h, R, Z, target_tiles,
            segments, SEG=SEG, BLOCK_L=16, RAGGED=ragged, num_warps=4)
        _group_mean_kernel[(B * Z, max(1, triton.cdiv(d, block_dm)))](  # d = 0 still writes the counts
            h, members, lower, merged, counts, R, Z, d, segments, *h.stride(),
            SEG=SEG, BLOCK_S=min(pow2(segments), 32), BLOCK_M=8, BLOCK_D=block_dm, num_warps=4)
    return merged, group, counts
