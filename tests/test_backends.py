"""The backends (cpu, triton, cuda) against python_ref, through the backend protocol.

Backends: "cpu" (pure PyTorch tuned for CPU tensors), "triton" on CPU tensors (under TRITON_INTERPRET=1, which conftest.py sets when there is no
GPU) and on CUDA tensors; "cuda" (the compiled extension) on CUDA tensors when it is built. Shapes
are small so the Triton interpreter runs the file in minutes.

Tolerances. Every backend computes in fp32, and fp16 / bf16 inputs are exact in fp32, so the scores
of all input dtypes carry fp32 rounding only: they must stay within 2x python_ref's own error
against a float64 evaluation, plus 4 fp32 ulps of the largest score (a GPU's exp2 is an
approximation good to about 2 ulps, and rewriting exp as exp2 rounds the exponent once more).
Selections are exact: the indices must equal python_ref.topk_select of the scores the backend itself
returned. Outputs rounded to fp16 / bf16 (group means) may differ from a float64 evaluation by one
ulp of the output dtype; bypass_align does python_ref's fp32 operations in its order: bit-equal.
"""
import importlib
import os

import pytest
import torch

import brute
import python_ref
from conftest import DTYPES

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NO_INTERPRETER = ("TRITON_INTERPRET=1 is not set (tests/conftest.py sets it when no GPU is present), "
                  "so Triton cannot run CPU tensors")
FP32_ULP = 2.0 ** -23
MANTISSA_ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _import_or_reason(name):
    try:
        return importlib.import_module(name), None
    except ImportError as e:
        return None, f"{name} is not importable: {e}"


def _cuda_backend():
    """The compiled backend module, or None and why not (imported defensively: it may not be built)."""
    if not CUDA:
        return None, "needs a CUDA device"
    module, why = _import_or_reason("swiftvlm_kernels.cuda_backend")
    if module is not None and not module.available():
        return None, module.reason
    return module, why


def _emulator_reason():
    """Why the CUDA kernels cannot run on the CPU emulation here (None: they can)."""
    import shutil

    return None if shutil.which("g++") else "g++ is not installed (the CUDA emulation compiles csrc/ with it)"


def _backend_params():
    triton_mod, triton_why = _import_or_reason("swiftvlm_kernels.triton_kernels")
    cuda_mod, cuda_why = _cuda_backend()
    emu_why = _emulator_reason()
    return [
        pytest.param(("cpu", "cpu"), id="cpu"),
        pytest.param(("cuda-emu", "cpu"), id="cuda-emu", marks=pytest.mark.skipif(emu_why is not None,
                                                                                   reason=emu_why or "")),
        pytest.param(("triton", "cpu"), id="triton-cpu", marks=pytest.mark.skipif(
            triton_mod is None or not INTERPRET, reason=triton_why or NO_INTERPRETER)),
        pytest.param(("triton", "cuda"), id="triton-cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
            triton_mod is None or not CUDA, reason=triton_why or "needs a CUDA device")]),
        pytest.param(("cuda", "cuda"), id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
            cuda_mod is None, reason=cuda_why or "")]),
    ]


@pytest.fixture(params=_backend_params())
def backend(request):
    """(backend module, device) for one backend of the protocol. cuda-emu: the CUDA kernels of csrc/
    compiled for the CPU emulation (tests/cuda_emulator.py), on CPU tensors."""
    name, device = request.param
    if name == "cuda-emu":
        import cuda_emulator

        return cuda_emulator.backend(), device
    module = importlib.import_module({"cpu": "swiftvlm_kernels.cpu", "triton": "swiftvlm_kernels.triton_kernels",
                                      "cuda": "swiftvlm_kernels.cuda_backend"}[name])
    return module, device


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _on(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)


# ---------------------------------------------------------------- tv_score / score_select

def _attention_inputs(B, H, Hkv, L, D, dtype, seed, strided_k=False, pad=False, device="cpu"):
    g = _gen(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    if strided_k:
        # the layout [B, L, Hkv, D] of a projection output viewed as [B, Hkv, L, D], then every other
        # feature of a 2D-wide buffer: neither L nor D is contiguous (the view is taken on the device)
        k = torch.randn(B, L, Hkv, 2 * D, generator=g).to(dtype).to(device).transpose(1, 2)[..., ::2]
    else:
        k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    mask = None
    if pad:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, :5] = False  # left padding
        mask[2, L - 3:] = False  # right padding
        mask[2, 1] = False
    return q, k, mask


def _assert_scores_accurate(got, q, k, vis_start, vis_len, scale, mask):
    """Error against float64 within 2x python_ref's fp32 error, plus 4 fp32 ulps of the largest score."""
    cpu = [t if t is None else t.cpu() for t in (q, k, vis_start, mask)]
    exact = brute.tv_score(*cpu[:3], vis_len, scale, cpu[3])
    _assert_within_reference_error(got, exact, python_ref.tv_score(*cpu[:3], vis_len, scale, cpu[3]))


def _assert_within_reference_error(got, exact, ref, name="scores"):
    """fp32 got against float64 exact: within 2x python_ref's own error plus 4 fp32 ulps of the largest
    exact value (the module docstring)."""
    assert got.dtype == torch.float32 and got.shape == exact.shape, name
    if exact.numel() == 0:
        return
    err = (got.cpu().double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    floor = 4 * FP32_ULP * exact.abs().max().item()
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} vs python_ref's {ref_err:.3g}"


# (B, H, Hkv, L, D, vis_len): GQA ratios 1, 4, 7; odd L and D; L over several key splits
TV_SHAPES = [(3, 7, 7, 83, 33, 40), (3, 8, 2, 33, 16, 7), (3, 14, 2, 83, 7, 33), (1, 4, 1, 7, 8, 7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TV_SHAPES, ids=lambda s: "B{}-H{}-Hkv{}-L{}-D{}-V{}".format(*s))
def test_tv_score(backend, shape, dtype):
    impl, device = backend
    B, H, Hkv, L, D, vis_len = shape
    q, k, mask = _attention_inputs(B, H, Hkv, L, D, dtype, seed=sum(shape), pad=B == 3)
    vis_start = torch.tensor([0, L - vis_len, (L - vis_len) // 2][:B])
    q, k, vis_start, mask = _on(device, q, k, vis_start, mask)
    got = impl.tv_score(q, k, vis_start, vis_len, D ** -0.5, mask)
    _assert_scores_accurate(got, q, k, vis_start, vis_len, D ** -0.5, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tv_score_strided_k(backend, dtype):
    impl, device = backend
    q, k, mask = _attention_inputs(3, 8, 2, 83, 16, dtype, seed=5, strided_k=True, pad=True, device=device)
    assert k.stride(-1) == 2 and k.stride(2) == 2 * 2 * 16
    vis_start = torch.tensor([3, 40, 0], dtype=torch.int32)
    q, k, vis_start, mask = _on(device, q, k, vis_start, mask)
    got = impl.tv_score(q, k, vis_start, 40, 0.7, mask)
    _assert_scores_accurate(got, q, k, vis_start, 40, 0.7, mask)


def test_tv_score_edge_values(backend):
    """All keys masked -> zero scores; visual positions outside [0, L) score 0 (no out-of-bounds read)."""
    impl, device = backend
    q, k, mask = _attention_inputs(3, 4, 2, 20, 8, torch.float32, seed=9, pad=True)
    mask[0] = False
    vis_start = torch.tensor([2, -4, 15])  # sample 1 starts before 0, sample 2 runs past L
    q, k, vis_start, mask = _on(device, q, k, vis_start, mask)
    got = impl.tv_score(q, k, vis_start, 9, 0.5, mask)
    assert torch.all(got[0] == 0) and torch.all(got[1, :4] == 0) and torch.all(got[2, 5:] == 0)
    _assert_scores_accurate(got, q, k, vis_start, 9, 0.5, mask)


@pytest.mark.parametrize("keep", [0, 1, 13, 40])
@pytest.mark.parametrize("shape", [(3, 7, 7, 83, 33, 40), (3, 8, 2, 60, 16, 40)], ids=["gqa1", "gqa4"])
def test_score_select(backend, shape, keep):
    impl, device = backend
    B, H, Hkv, L, D, vis_len = shape
    q, k, mask = _attention_inputs(B, H, Hkv, L, D, torch.float16, seed=keep, pad=True)
    vis_start = torch.tensor([1, L - vis_len, 7])
    k[:, :, vis_start[0] + 5] = k[:, :, vis_start[0] + 9]  # equal keys: tied scores in sample 0
    q, k, vis_start, mask = _on(device, q, k, vis_start, mask)
    keep_idx, rest_idx, scores = impl.score_select(q, k, vis_start, vis_len, keep, D ** -0.5, mask)
    want_keep, want_rest = python_ref.topk_select(scores.cpu(), keep)
    assert keep_idx.dtype == rest_idx.dtype == torch.int64
    assert torch.equal(keep_idx.cpu(), want_keep) and torch.equal(rest_idx.cpu(), want_rest)
    _assert_scores_accurate(scores, q, k, vis_start, vis_len, D ** -0.5, mask)


def test_score_select_all_keys_masked(backend):
    impl, device = backend
    q, k, mask = _attention_inputs(2, 4, 4, 30, 8, torch.float32, seed=3, pad=False)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1] = False
    q, k, vis_start, mask = _on(device, q, k, torch.tensor([4, 4]), mask)
    keep_idx, rest_idx, scores = impl.score_select(q, k, vis_start, 20, 6, 0.3, mask)
    assert torch.all(scores[1] == 0)
    assert keep_idx[1].tolist() == list(range(6)) and rest_idx[1].tolist() == list(range(6, 20))


# ---------------------------------------------------------------- topk_select

def _scores_with_specials(B, N, seed):
    """Scores on a coarse grid (many ties) with NaN, +-inf and both zeros sprinkled in."""
    g = _gen(seed)
    s = torch.round(torch.randn(B, N, generator=g) * 2) / 2
    pick = torch.rand(B, N, generator=g)
    s[pick < 0.05] = float("nan")
    s[(pick >= 0.05) & (pick < 0.08)] = float("-inf")
    s[(pick >= 0.08) & (pick < 0.10)] = float("inf")
    s[(pick >= 0.10) & (pick < 0.15)] = -0.0
    return s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 7, 33, 83, 1025])
def test_topk_select(backend, N, dtype):
    impl, device = backend
    scores = _scores_with_specials(3, N, seed=N).to(dtype)
    for k in sorted({0, 1, N // 3, N - 1, N}):
        keep, rest = impl.topk_select(scores.to(device), k)
        want_keep, want_rest = python_ref.topk_select(scores, k)
        assert keep.dtype == rest.dtype == torch.int64
        assert torch.equal(keep.cpu(), want_keep) and torch.equal(rest.cpu(), want_rest), f"k={k}"


def test_topk_select_large_strided(backend):
    """N = 5000 (several blocks, not a power of two), k not a power of two, a transposed view."""
    impl, device = backend
    scores = _scores_with_specials(5000, 3, seed=1).t()
    assert not scores.is_contiguous()
    for k in (1234, 4999):
        keep, rest = impl.topk_select(scores.to(device), k)
        want_keep, want_rest = python_ref.topk_select(scores, k)
        assert torch.equal(keep.cpu(), want_keep) and torch.equal(rest.cpu(), want_rest), f"k={k}"


def test_topk_select_zero_signs_tie(backend):
    impl, device = backend
    scores = torch.tensor([[0.0, -0.0, 0.0, -0.0, -1.0, float("nan")]])
    keep, rest = impl.topk_select(scores.to(device), 3)
    assert keep.tolist() == [[0, 1, 2]] and rest.tolist() == [[3, 4, 5]]


# ---------------------------------------------------------------- group_merge

def _cosine_fp64(h, Z):
    """float64 cos(h_i, h_{t_z}) [B, R, Z] as python_ref defines it (NaN -> -inf)."""
    hd = h.double()
    unit = hd / hd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = python_ref.group_targets(h.shape[1], Z)
    sim = unit @ unit[:, t].transpose(1, 2)
    return torch.where(torch.isnan(sim), torch.full_like(sim, float("-inf")), sim)


def _assert_merge_consistent(h, merged, group, counts):
    """counts and means follow the backend's own groups: fp64 mean, one output-dtype ulp of slack."""
    B, R, d = h.shape
    Z = merged.shape[1]
    assert merged.dtype == h.dtype and group.dtype == torch.int64 and counts.dtype == torch.int32
    assert torch.equal(counts, torch.stack([torch.bincount(g, minlength=Z) for g in group]).int())
    members = group[:, :, None].expand(B, R, d)
    sums = torch.zeros(B, Z, d, dtype=torch.float64).scatter_add_(1, members, h.double())
    want = sums / counts[:, :, None].double()
    # fp32 sums of up to R terms in any order, then one rounding to the output dtype
    atol = R * 2.0 ** -24 * h.double().nan_to_num().abs().max().item()
    torch.testing.assert_close(merged.double(), want, rtol=MANTISSA_ULP[h.dtype], atol=atol, equal_nan=True)


def _run_merge_twice(impl, h, Z):
    first = impl.group_merge(h, Z)
    second = impl.group_merge(h, Z)
    for a, b in zip(first, second):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num()))
    return tuple(t.cpu() for t in first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,Z,d", [(7, 1, 33), (7, 7, 7), (33, 5, 64), pytest.param(83, 9, 33, marks=pytest.mark.slow),
                                   pytest.param(83, 83, 16, marks=pytest.mark.slow)])
def test_group_merge_random(backend, R, Z, d, dtype):
    """Random tokens: the chosen target is the most similar one up to fp32 rounding of the cosine."""
    impl, device = backend
    _check_merge_near_ties(impl, device, torch.randn(3, R, d, generator=_gen(R * Z + d)).to(dtype), Z)


def _check_merge_near_ties(impl, device, h, Z):
    """The chosen target is the most similar one up to fp32 rounding of the cosine; ids equal the
    reference wherever the two best targets are further apart than that; means follow the groups."""
    B, R, d = h.shape
    merged, group, counts = _run_merge_twice(impl, h.to(device), Z)
    _, want_group, want_counts = python_ref.group_merge(h, Z)

    t = python_ref.group_targets(R, Z)
    assert torch.equal(group[:, t], torch.arange(Z).expand(B, Z))  # targets lead their own group
    sim = _cosine_fp64(h, Z)
    eps = 4 * d * 2.0 ** -24  # fp32 dot products and norms over d terms
    chosen = sim.gather(2, group[:, :, None])[..., 0]
    best, _ = sim.max(2)
    free = torch.ones(R, dtype=torch.bool)
    free[t] = False
    assert torch.all(chosen[:, free] >= best[:, free] - eps)
    top2 = sim.topk(min(2, Z), dim=2).values
    gap = top2[..., 0] - top2[..., 1] if Z > 1 else torch.full((B, R), float("inf"))
    clear = free[None, :] & (gap > eps)  # ids may differ only where two targets are within rounding
    assert torch.equal(group[clear], want_group[clear])
    _assert_merge_consistent(h, merged, group, counts)
    if torch.equal(group, want_group):
        assert torch.equal(counts, want_counts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_merge_clear_margins(backend, dtype):
    """Tokens built near one target each: every group id must equal the reference."""
    impl, device = backend
    g = _gen(11)
    B, R, Z, d = 3, 83, 6, 40
    t = python_ref.group_targets(R, Z)
    centres = torch.linalg.qr(torch.randn(B, d, Z, generator=g)).Q.transpose(1, 2)  # orthonormal directions
    pick = torch.randint(0, Z, (B, R), generator=g)
    pick[:, t] = torch.arange(Z)
    scale = 0.5 + 3 * torch.rand(B, R, 1, generator=g)
    noise = 0.05 * torch.randn(B, R, d, generator=g)
    h = (centres.gather(1, pick[:, :, None].expand(B, R, d)) + noise) * scale
    h = h.to(dtype)
    merged, group, counts = _run_merge_twice(impl, h.to(device), Z)
    want_merged, want_group, want_counts = python_ref.group_merge(h, Z)
    assert torch.equal(group, want_group) and torch.equal(counts, want_counts)
    _assert_merge_consistent(h, merged, group, counts)
    atol = R * 2.0 ** -24 * h.double().abs().max().item()
    torch.testing.assert_close(merged.double(), want_merged.double(), rtol=MANTISSA_ULP[dtype], atol=atol)


def test_group_merge_ties_zero_nan_strided(backend):
    """Equal similarities go to the lowest z, also across target blocks; zero and NaN tokens; strided h."""
    impl, device = backend
    B, R, Z, d = 2, 100, 80, 9  # targets floor(1.25 z): tokens 4, 9, 14, ... are not targets
    base = torch.randn(B, d, R, generator=_gen(2))
    base[:, :, 87] = base[:, :, 6]  # the targets of groups 5 and 70 are equal
    base[:, :, 4] = 3 * base[:, :, 6]  # cosine 1 to both: group 5
    base[0, :, 9] = 0.0  # cosine 0 to every target: group 0
    base[1, :, 14] = float("nan")  # NaN ranks lowest, so all targets tie: group 0
    h = base.transpose(1, 2)
    assert not h.is_contiguous()
    merged, group, counts = _run_merge_twice(impl, h.to(device), Z)
    _, want_group, want_counts = python_ref.group_merge(h, Z)
    assert torch.equal(group, want_group) and torch.equal(counts, want_counts)
    assert group[:, 4].tolist() == [5, 5] and group[0, 9] == 0 and group[1, 14] == 0
    assert torch.all(counts[:, 70] == 1)
    _assert_merge_consistent(h, merged, group, counts)


# ---------------------------------------------------------------- bypass_align

def _align_inputs(B, R, Z, d, dtype, seed):
    g = _gen(seed)
    h = torch.randn(B, R, d, generator=g).to(dtype)
    group = torch.randint(0, Z, (B, R), generator=g)
    now = torch.randn(B, Z, d, generator=g).to(dtype)
    then = torch.randn(B, Z, d, generator=g).to(dtype)
    return h, group, now, then


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,Z,d", [(1, 1, 8), (7, 3, 33), (83, 83, 16)])
def test_bypass_align(backend, R, Z, d, dtype):
    """The same fp32 operations as python_ref, one rounding at the end: bit-equal output."""
    impl, device = backend
    h, group, now, then = _align_inputs(3, R, Z, d, dtype, seed=R + d)
    got = impl.bypass_align(*_on(device, h, group, now, then))
    assert got.dtype == dtype and got.shape == h.shape
    assert torch.equal(got.cpu(), python_ref.bypass_align(h, group, now, then))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bypass_align_into(backend, dtype):
    impl, device = backend
    B, R, Z, d, M = 3, 33, 5, 83, 50
    h, group, now, then = _align_inputs(B, R, Z, d, dtype, seed=4)
    rows = torch.stack([torch.randperm(M, generator=_gen(b))[:R] for b in range(B)])
    group = group.int()  # int32 ids are accepted too
    dst = torch.randn(B, M, d, generator=_gen(5)).to(dtype)
    want = dst.clone()
    python_ref.bypass_align_into(want, rows, h, group, now, then)
    got = dst.to(device)
    assert impl.bypass_align_into(got, *_on(device, rows, h, group, now, then)) is None
    assert torch.equal(got.cpu(), want)


def test_bypass_align_strided_into_strided_dst(backend):
    impl, device = backend
    B, R, Z, d, M = 2, 7, 3, 33, 12
    h, group, now, then = _align_inputs(B, R, Z, d, torch.float32, seed=6)
    h = h.transpose(1, 2).contiguous().transpose(1, 2)
    dst_base = torch.randn(B, d, M, generator=_gen(7))
    rows = torch.stack([torch.randperm(M, generator=_gen(10 + b))[:R] for b in range(B)])
    want = dst_base.transpose(1, 2).clone()
    python_ref.bypass_align_into(want, rows, h, group, now, then)
    now_view = torch.cat([now, now], dim=2).to(device)[..., :d]  # a strided view, taken on the device
    got_base = dst_base.to(device)
    impl.bypass_align_into(got_base.transpose(1, 2), *_on(device, rows, h, group), now_view, then.to(device))
    assert torch.equal(got_base.transpose(1, 2).cpu(), want)


def test_bypass_align_out_of_range_values_stay_in_bounds(backend):
    """Bad group ids and rows (value checks off) must not touch memory outside the tensors."""
    impl, device = backend
    B, R, Z, d, M = 2, 6, 3, 16, 8
    h, group, now, then = _align_inputs(B, R, Z, d, torch.float32, seed=8)
    group[0, 1], group[1, 2] = -1, Z + 5
    rows = torch.tensor([[0, 2, 4, 6, -1, 7], [1, 3, 5, 7, M, M + 100]])
    dst = torch.zeros(B, M, d)
    got = dst.to(device)
    impl.bypass_align_into(got, *_on(device, rows, h, group, now, then))
    ok = (group >= 0) & (group < Z)
    want = python_ref.bypass_align(h, group, now, then)
    got = got.cpu()
    for b in range(B):
        for i in range(R):
            r = int(rows[b, i])
            if 0 <= r < M and ok[b, i]:
                assert torch.equal(got[b, r], want[b, i])
    assert torch.all(got[1, [0, 2, 4, 6]] == 0)  # rows nobody targets stay untouched


# ---------------------------------------------------------------- compact / restore

def _partition(B, M, k, seed):
    perm = torch.stack([torch.randperm(M, generator=_gen(seed + b)) for b in range(B)])
    return perm[:, :k].sort(1).values, perm[:, k:].sort(1).values


# (B, n, d, M, k, Z): merging, dropping, everything kept, nothing kept, Z = R, odd d; dropping (Z = 0:
# the rest restored unchanged, an ALVTS stage) with d = 16 (whole vectors) and nothing kept
COMPACT_SHAPES = [(3, 40, 33, 20, 6, 4), (2, 17, 8, 9, 3, 0), (2, 12, 16, 12, 12, 0), (2, 15, 7, 6, 0, 6),
                  (1, 30, 5, 25, 24, 1), (2, 21, 16, 11, 4, 0), (2, 10, 8, 6, 0, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", COMPACT_SHAPES, ids=lambda s: "B{}-n{}-d{}-M{}-k{}-Z{}".format(*s))
def test_compact_and_restore(backend, shape, dtype):
    """Both are copies plus python_ref's fp32 arithmetic in its order: bit-equal, every output."""
    impl, device = backend
    B, n, d, M, k, Z = shape
    g = _gen(sum(shape))
    h = torch.randn(B, n, d, generator=g).to(dtype)
    h[:, ::3, 0] = -0.0
    vis_start = torch.randint(0, n - M + 1, (B,), generator=g)
    keep, rest = _partition(B, M, k, sum(shape))
    want = python_ref.compact(h, vis_start, keep, rest, Z)
    got = impl.compact(*_on(device, h, vis_start, keep.int(), rest), Z)  # int32 slots are accepted too
    for name, a, b in zip(("h_new", "src", "rest_h", "merged_rows", "inverse"), got, want):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b), name
    later = torch.randn(want[0].shape, generator=g).to(dtype)
    # Z = 0 (nothing merged): the rest tokens come back unchanged and group is not read (any values)
    group = torch.randint(0, Z, (B, M - k), generator=g) if Z else torch.randint(-9, 99, (B, M - k), generator=g)
    then = torch.randn(B, Z, d, generator=g).to(dtype)
    args = (later, want[4], vis_start, rest, want[2], group, want[3], then)
    restored = impl.restore(*_on(device, *args)).cpu()
    assert torch.equal(restored, python_ref.restore(*args))
    if Z == 0:  # bit for bit: the rest rows are h's own (-0.0 included)
        rows = vis_start[:, None] + rest
        assert torch.equal(restored.gather(1, rows[..., None].expand(-1, -1, d)).view(torch.uint8),
                           h.gather(1, rows[..., None].expand(-1, -1, d)).view(torch.uint8))


def test_compact_and_restore_strided(backend):
    impl, device = backend
    B, n, d, M, k, Z = 2, 20, 9, 11, 4, 3
    base = torch.randn(B, d, 2 * n, generator=_gen(20))
    keep, rest = _partition(B, M, k, 21)
    vis_start = torch.tensor([3, 6])
    h = base.transpose(1, 2)[:, ::2]  # neither rows nor columns contiguous
    want = python_ref.compact(h, vis_start, keep, rest, Z)
    got = impl.compact(base.to(device).transpose(1, 2)[:, ::2], *_on(device, vis_start, keep, rest), Z)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    group = torch.randint(0, Z, (B, M - k), generator=_gen(22))
    then = torch.randn(B, 2 * Z, d, generator=_gen(23))[:, ::2]
    args = (want[0].transpose(1, 2).contiguous().transpose(1, 2), want[4], vis_start, rest, want[2], group, want[3], then)
    assert torch.equal(impl.restore(*_on(device, *args)).cpu(), python_ref.restore(*args))


def test_compact_and_restore_out_of_range_values_stay_in_bounds(backend):
    """Bad starts, slots, group ids and rows (value checks off on a GPU) never touch memory outside
    the tensors: the kernels clamp or skip them (the outputs are then unspecified)."""
    impl, device = backend
    if device == "cpu" and impl.__name__.endswith(".cpu"):
        pytest.skip("the cpu backend runs only after the value checks (CPU tensors are always checked)")
    B, n, d, M, k, Z = 2, 12, 4, 6, 2, 2
    h = torch.randn(B, n, d, generator=_gen(30))
    keep = torch.tensor([[0, 9], [-3, 5]])
    rest = torch.tensor([[1, 2, 3, 40], [0, 1, 2, 3]])
    out = impl.compact(*_on(device, h, torch.tensor([50, -4]), keep, rest), Z)
    assert out[0].shape == (B, n - M + k + Z, d)
    inverse = torch.tensor([[0, 1, -1, 500, -7, 3, 4, 5, 6, 7, 8, 9], [0] * 12])
    group = torch.tensor([[0, -1, 9, 1], [1, 1, 0, 0]])
    merged_rows = torch.tensor([[0, 10**6], [-5, 3]])
    got = impl.restore(*_on(device, out[0], inverse, torch.tensor([2, 30]), rest, out[2], group, merged_rows,
                            torch.randn(B, Z, d)))
    assert got.shape == (B, n, d)
    got = impl.restore(*_on(device, out[0], inverse, torch.tensor([2, 30]), rest, out[2], group, merged_rows[:, :0],
                            torch.randn(B, 0, d)))  # Z = 0: group not read, rows outside [0, n) skipped
    assert got.shape == (B, n, d)


# ---------------------------------------------------------------- attention_importance

def _importance_inputs(B, H, Hk, L, E, dtype, seed, pad=False):
    g = _gen(seed)
    q, k = torch.randn(B, H, L, E, generator=g).to(dtype), torch.randn(B, Hk, L, E, generator=g).to(dtype)
    mask = None
    if pad:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[-1, :min(3, L - 1)] = False  # left padding of the last sample
        if B > 1 and L > 4:
            mask[0, L // 2] = False  # a padding row inside the first sample
    return q, k, mask


def _assert_importance_accurate(got, q, k, vis_start, vis_len, scale, mask, max_vis_len=None):
    """t2v and v2v each within 2x python_ref's fp32 error against float64, plus 4 fp32 ulps of the
    largest value."""
    q, k, vis_start, mask = (t if t is None else t.cpu() for t in (q, k, vis_start, mask))
    counts = vis_len.cpu() if isinstance(vis_len, torch.Tensor) else vis_len
    exact = brute.attention_importance_fp64(q, k, vis_start, counts, scale, mask, max_vis_len)
    ref = python_ref.attention_importance(q, k, vis_start, counts, scale, mask, max_vis_len)
    for name, a, e, r in zip(("t2v", "v2v"), got, exact, ref):
        _assert_within_reference_error(a, e, r, name)


def _exact_backend(impl):
    """The kernel backends, whose tiles depend on neither the batch nor the width (bit-equal results
    per sample); the cpu backend's batched matmul may round differently with the batch."""
    return impl.__name__ != "swiftvlm_kernels.cpu"


# (B, H, Hk, L, E, vis_len): GQA ratios 1, 4, 7 and 20 (two head groups of the kernels' 16), E from 1
# to 256, L from 1 to 130 (several row and key tiles), every row visual
IMPORTANCE_SHAPES = [(3, 7, 7, 83, 33, 40), (3, 8, 2, 33, 16, 7), (2, 14, 2, 30, 5, 12), (2, 4, 1, 7, 1, 7),
                     (2, 2, 1, 1, 128, 1), (1, 2, 1, 130, 256, 70), (1, 20, 1, 40, 8, 25)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", IMPORTANCE_SHAPES, ids=lambda s: "B{}-H{}-Hk{}-L{}-E{}-V{}".format(*s))
def test_attention_importance(backend, shape, dtype):
    """Against float64: visual spans at the start, the end and the middle; a left-padded sample and a
    padding row inside another."""
    impl, device = backend
    B, H, Hk, L, E, n = shape
    q, k, mask = _importance_inputs(B, H, Hk, L, E, dtype, seed=sum(shape), pad=B > 1)
    args = (*_on(device, q, k, torch.tensor([0, L - n, (L - n) // 2][:B])), n, E ** -0.5, _on(device, mask)[0])
    _assert_importance_accurate(impl.attention_importance(*args), *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_importance_strided(backend, dtype):
    """q and k as views of [B, L, heads, 2E] projection outputs (neither L nor E unit-stride), int32
    vis_start, a strided key_mask: read in place, the contiguous inputs' results."""
    impl, device = backend
    B, H, Hk, L, E = 2, 6, 3, 37, 12
    g = _gen(70)
    q = torch.randn(B, L, H, 2 * E, generator=g).to(dtype).to(device).transpose(1, 2)[..., ::2]
    k = torch.randn(B, L, Hk, 2 * E, generator=g).to(dtype).to(device).transpose(1, 2)[..., ::2]
    mask = (torch.rand(B, 2 * L, generator=g) > 0.2).to(device)[:, ::2]
    mask[:, 5:25] = True
    vis_start = torch.tensor([5, 9], dtype=torch.int32, device=device)
    assert q.stride(-1) == 2 and not mask.is_contiguous()
    got = impl.attention_importance(q, k, vis_start, 16, 0.3, mask)
    _assert_importance_accurate(got, q, k, vis_start, 16, 0.3, mask)
    want = impl.attention_importance(q.contiguous(), k.contiguous(), vis_start, 16, 0.3, mask.contiguous())
    for a, b in zip(got, want):
        assert torch.equal(a, b) if _exact_backend(impl) else torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_attention_importance_edge_values(backend):
    """Visual positions outside [0, L) give 0 and read nothing; a sample without a valid row gives 0; a
    sample whose valid rows are all visual has t2v 0; vis_len 0 gives empty results."""
    impl, device = backend
    q, k, _ = _importance_inputs(4, 4, 2, 20, 8, torch.float32, seed=71)
    mask = torch.ones(4, 20, dtype=torch.bool)
    mask[2] = False
    mask[3, :5] = False
    mask[3, 14:] = False  # sample 3: rows 5..13 valid, all visual
    vis_start = torch.tensor([-4, 15, 3, 5])  # sample 0 starts before 0, sample 1 runs past L
    q, k, vis_start, mask = _on(device, q, k, vis_start, mask)
    t2v, v2v = impl.attention_importance(q, k, vis_start, 9, 0.5, mask)
    for out in (t2v, v2v):
        assert torch.all(out[0, :4] == 0) and torch.all(out[1, 5:] == 0) and torch.all(out[2] == 0)
    assert torch.all(t2v[3] == 0) and torch.all(v2v[3] > 0)
    _assert_importance_accurate((t2v, v2v), q, k, vis_start, 9, 0.5, mask)
    empty = impl.attention_importance(q, k, vis_start, 0, 0.5, mask)
    assert empty[0].shape == empty[1].shape == (4, 0)


def test_attention_importance_ragged_samples_equal_themselves_alone(backend):
    """Per-sample visual counts (0 and the full width included): each row is the sample run alone (bit
    for bit on the kernel backends), then zeros; accurate against float64; repeated runs bit-equal."""
    impl, device = backend
    B, H, Hk, L, E = 4, 8, 2, 45, 20
    q, k, mask = _importance_inputs(B, H, Hk, L, E, torch.bfloat16, seed=72, pad=True)
    vis_start, counts = torch.tensor([3, 0, 20, 10]), torch.tensor([30, 0, 25, 7])
    q, k, vis_start, counts, mask = _on(device, q, k, vis_start, counts, mask)
    got = impl.attention_importance(q, k, vis_start, counts, 0.25, mask, 30)
    assert got[0].shape == got[1].shape == (B, 30)
    _assert_importance_accurate(got, q, k, vis_start, counts, 0.25, mask, 30)
    again = impl.attention_importance(q, k, vis_start, counts, 0.25, mask, 30)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    for b in range(B):
        n = int(counts[b])
        alone = impl.attention_importance(q[b:b + 1], k[b:b + 1], vis_start[b:b + 1], n, 0.25, mask[b:b + 1])
        for a, one in zip(got, alone):
            if _exact_backend(impl):
                assert torch.equal(a[b, :n], one[0]), b
            else:
                torch.testing.assert_close(a[b, :n], one[0], rtol=1e-6, atol=1e-9)
            assert not a[b, n:].any()


def test_attention_importance_is_deterministic(backend):
    """The same input gives bit-identical results on every run (no atomics, fixed summation orders)."""
    impl, device = backend
    q, k, mask = _importance_inputs(2, 20, 1, 70, 24, torch.float16, seed=73, pad=True)
    vis_start = torch.tensor([2, 30])
    q, k, vis_start, mask = _on(device, q, k, vis_start, mask)
    first = impl.attention_importance(q, k, vis_start, 40, 0.2, mask)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, impl.attention_importance(q, k, vis_start, 40, 0.2, mask)))


def _importance_nan_cases():
    """(name, q, k, key_mask, NaN samples): torch.softmax's NaN rows make every probability of their
    sample NaN in the reference, also from a padding row (weight 0: 0 * NaN), but not from a row
    before the sample's first valid key (no probabilities at all)."""
    g = _gen(74)
    B, H, Hk, L, E = 4, 2, 1, 12, 4
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, :2] = False  # rows 0-1: before every sample's first valid key
    mask[1, 6] = False
    mask[3, 8] = False

    def fresh():
        return torch.randn(B, H, L, E, generator=g), torch.randn(B, Hk, L, E, generator=g)

    cases = []
    q, k = fresh()
    q[0, 1, 7, 2] = float("nan")  # a valid row
    q[1, 0, 6, 0] = float("nan")  # a padding row with valid keys before it
    q[2, 0, 1, 1] = float("nan")  # a row before the first valid key: no effect
    cases.append(("nan in q", q, k, mask, [0, 1]))
    q, k = fresh()
    k[0, 0, 4, 3] = float("inf")  # a valid key: +inf (or NaN) logits for some rows
    k[3, 0, 8, 1] = float("nan")  # a padding key: never a logit
    cases.append(("inf in k", q, k, mask, [0]))
    q, k = fresh()
    k = k.abs().neg()
    q[2] = float("inf")  # every valid logit of sample 2 is -inf
    cases.append(("only -inf logits", q, k, mask, [2]))
    return cases


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on inf - inf
@pytest.mark.parametrize("case", range(3), ids=[c[0] for c in _importance_nan_cases()])
def test_attention_importance_nan_and_inf_follow_the_reference(backend, case):
    impl, device = backend
    _, q, k, mask, nan_samples = _importance_nan_cases()[case]
    vis_start = torch.tensor([3, 4, 2, 5])
    want = python_ref.attention_importance(q, k, vis_start, 5, 0.5, mask)
    got = [t.cpu() for t in impl.attention_importance(*_on(device, q, k, vis_start), 5, 0.5, mask.to(device))]
    for a, b in zip(got, want):
        assert b[nan_samples].isnan().all() and not b[[i for i in range(4) if i not in nan_samples]].isnan().any()
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the op on CUDA: compile and graphs

@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_score_select_compile_and_cuda_graph():
    import swiftvlm_kernels  # noqa: F401  (registers torch.ops.swiftvlm)

    B, H, Hkv, L, D, vis_len, keep = 2, 32, 8, 700, 128, 576, 192
    q, k, mask = _attention_inputs(B, H, Hkv, L, D, torch.float16, seed=0)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :9] = False
    q, k, vis_start, mask = _on("cuda", q, k, torch.tensor([35, 60]), mask)

    def prune(q, k, vis_start, mask):
        return torch.ops.swiftvlm.score_select(q, k, vis_start, vis_len, keep, D ** -0.5, mask)

    with swiftvlm_kernels.use_backend("triton"):
        _compile_and_capture(prune, q, k, vis_start, mask)


def _compile_and_capture(prune, q, k, vis_start, mask):
    eager = prune(q, k, vis_start, mask)
    compiled = torch.compile(prune, fullgraph=True)(q, k, vis_start, mask)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        prune(q, k, vis_start, mask)  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = prune(q, k, vis_start, mask)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, prune(q, k, vis_start, mask)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- hypothesis: shapes and values nobody picked

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# The example count, derandomisation and health checks come from the tier's Hypothesis profile
# (tests/conftest.py): the same examples every run; SWIFTVLM_HYPOTHESIS_EXAMPLES=N hunts with N random ones.
_SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 0.5, 1e-30]


def _draw_spans(data, kv_heads, group, features):
    """(B, H, Hkv, L, D, vis_len, vis_start) drawn: Hkv in [1, kv_heads], H = Hkv x [1, group], L up to
    70, D in [1, features], a visual span per sample inside the sequence."""
    Hkv = data.draw(st.integers(1, kv_heads), label="Hkv")
    H = Hkv * data.draw(st.integers(1, group), label="group")
    B, L, D = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 70), label="L"), \
        data.draw(st.integers(1, features), label="D")
    vis_len = data.draw(st.integers(0, L), label="vis_len")
    vis_start = torch.tensor([data.draw(st.integers(0, L - vis_len)) for _ in range(B)])
    return B, H, Hkv, L, D, vis_len, vis_start


@given(data=st.data())
def test_hypothesis_score_select(backend, data):
    """Random batch / GQA / lengths / visual spans / padding: scores accurate, selection exact."""
    module, device = backend
    B, H, Hkv, L, D, vis_len, vis_start = _draw_spans(data, 3, 4, 24)
    keep = data.draw(st.integers(0, vis_len), label="keep")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    q, k, _ = _attention_inputs(B, H, Hkv, L, D, dtype, seed=data.draw(st.integers(0, 2**16)))
    mask = torch.rand(B, L, generator=_gen(L)) > data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="drop")
    q, k, vs, mask = _on(device, q, k, vis_start, mask)
    keep_idx, rest_idx, scores = module.score_select(q, k, vs, vis_len, keep, D ** -0.5, mask)
    _assert_scores_accurate(scores, q, k, vs, vis_len, D ** -0.5, mask)
    want_keep, want_rest = python_ref.topk_select(scores.cpu(), keep)
    assert torch.equal(keep_idx.cpu(), want_keep) and torch.equal(rest_idx.cpu(), want_rest)


@given(data=st.data())
def test_hypothesis_attention_importance(backend, data):
    """Random batch / GQA / E / lengths / visual spans / padding / dtype: accurate against float64."""
    module, device = backend
    B, H, Hk, L, E, vis_len, vis_start = _draw_spans(data, 2, 5, 40)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    q, k, _ = _importance_inputs(B, H, Hk, L, E, dtype, seed=data.draw(st.integers(0, 2**16)))
    mask = torch.rand(B, L, generator=_gen(L)) > data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="drop")
    q, k, vs, mask = _on(device, q, k, vis_start, mask)
    got = module.attention_importance(q, k, vs, vis_len, E ** -0.5, mask)
    _assert_importance_accurate(got, q, k, vs, vis_len, E ** -0.5, mask)


@given(values=st.lists(st.sampled_from(_SPECIAL) | st.floats(-4, 4, width=32), min_size=1, max_size=300),
       data=st.data())
def test_hypothesis_topk_select(backend, values, data):
    """Random lengths and k with NaN, infinities, signed zeros and ties: exactly python_ref."""
    module, device = backend
    k = data.draw(st.integers(0, len(values)), label="k")
    scores = torch.tensor([values, values[::-1]], dtype=torch.float32)
    keep, rest = module.topk_select(scores.to(device), k)
    want_keep, want_rest = python_ref.topk_select(scores, k)
    assert torch.equal(keep.cpu(), want_keep) and torch.equal(rest.cpu(), want_rest)


@pytest.mark.slow  # about 13 s under the Triton interpreter: full tier (test_group_merge_* cover the fast tier)
@given(data=st.data())
def test_hypothesis_group_merge(backend, data):
    """Random batch, R, Z, d and dtype, with duplicated and zero tokens mixed in."""
    module, device = backend
    B, R, d = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 60), label="R"), \
        data.draw(st.integers(1, 40), label="d")
    Z = data.draw(st.integers(1, R), label="Z")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    h = torch.randn(B, R, d, generator=_gen(data.draw(st.integers(0, 2**16))))
    for i in data.draw(st.lists(st.integers(0, R - 1), max_size=4), label="duplicates of token 0"):
        h[:, i] = h[:, 0]
    for i in data.draw(st.lists(st.integers(0, R - 1), max_size=2), label="zero tokens"):
        h[:, i] = 0.0
    _check_merge_near_ties(module, device, h.to(dtype), Z)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backend_is_bit_equal_to_the_reference(dtype):
    """The cpu backend runs python_ref's arithmetic in python_ref's order, in chunks of rows and heads
    (swiftvlm_kernels/cpu/_chunks.py): every output equals the reference's bit for bit, also at shapes
    that span several chunks."""
    import swiftvlm_kernels.cpu as cpu

    g = _gen(40)
    q, k = torch.randn(2, 8, 128, generator=g).to(dtype), torch.randn(2, 4, 1100, 128, generator=g).to(dtype)
    vis_start, mask = torch.tensor([30, 70]), torch.rand(2, 1100, generator=g) > 0.05
    for a, b in zip(cpu.score_select(q, k, vis_start, 1000, 333, 0.09, mask),
                    python_ref.score_select(q, k, vis_start, 1000, 333, 0.09, mask)):
        assert torch.equal(a, b)
    h = torch.randn(2, 700, 512, generator=g).to(dtype)
    for a, b in zip(cpu.group_merge(h, 31), python_ref.group_merge(h, 31)):
        assert torch.equal(a, b)
    group = torch.randint(0, 31, (2, 700), generator=g)
    now, then = torch.randn(2, 31, 512, generator=g).to(dtype), torch.randn(2, 31, 512, generator=g).to(dtype)
    assert torch.equal(cpu.bypass_align(h, group, now, then), python_ref.bypass_align(h, group, now, then))


# ---------------------------------------------------------------- special values (README, Errors)

def _nan_cases():
    """(name, q, k, key_mask): NaN in a query head, +inf in a key, only -inf logits at the valid keys,
    fp32 overflow of the logits; every batch also has a sample without a valid key (scores 0)."""
    g = _gen(50)
    B, H, Hkv, L, D = 4, 4, 2, 20, 8
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[3] = False
    mask[0, 3] = False
    out = []
    q, k = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    q[1, 2, 3] = float("nan")
    out.append(("nan in q", q, k, mask))
    q, k = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    k[2, 1, 5, 0] = float("inf")
    out.append(("inf in k", q, k, mask))
    q, k = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, L, D, generator=g).abs().neg()
    q[0] = float("inf")  # every valid logit of sample 0 is -inf
    out.append(("only -inf logits", q, k, mask))
    q, k = torch.randn(B, H, D, generator=g) * 1e20, torch.randn(B, Hkv, L, D, generator=g) * 1e20
    out.append(("fp32 overflow", q, k, mask))
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on inf - inf
@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _nan_cases()])
def test_nan_and_inf_follow_torch_softmax(backend, case):
    """NaN or inf in q or k: the scores python_ref gives (torch.softmax's: a NaN head makes the sample's
    scores NaN, a sample without a valid key scores 0), and NaN ranks lowest in the selection."""
    impl, device = backend
    _, q, k, mask = _nan_cases()[case]
    vis_start = torch.tensor([0, 4, 11, 2])
    want_keep, want_rest, want = python_ref.score_select(q, k, vis_start, 9, 4, 0.3, mask)
    keep, rest, got = (t.cpu() for t in impl.score_select(*_on(device, q, k, vis_start), 9, 4, 0.3, mask.to(device)))
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-7)
    assert torch.equal(want[3], torch.zeros(9))  # no valid key
    assert torch.equal(keep, want_keep) and torch.equal(rest, want_rest)


def test_debug_mode_names_the_non_finite_tensor(monkeypatch):
    import swiftvlm_kernels as sk

    monkeypatch.setenv("SWIFTVLM_DEBUG", "1")
    q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 10, 8)
    k[1, 0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="k: contains NaN or inf"):
        sk.score_select(q, k, torch.tensor([0, 1]), 5, 2)
    with pytest.raises(ValueError, match="h: contains NaN or inf"):
        sk.group_merge(torch.tensor([[[1.0, float("inf")], [0.0, 1.0]]]), 1)
    monkeypatch.setenv("SWIFTVLM_DEBUG", "0")
    assert sk.score_select(q, k, torch.tensor([0, 1]), 5, 2)[2][1].isnan().all()


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e-40])
def test_group_merge_is_scale_safe(backend, scale):
    """Token magnitudes near fp32's limits (1e30: squares overflow fp32; 1e-30 and subnormal 1e-40:
    squares underflow) group as at magnitude 1."""
    impl, device = backend
    h = torch.randn(2, 40, 33, generator=_gen(60))
    want = python_ref.group_merge(h, 5)[1]
    _, group, _ = (t.cpu() for t in impl.group_merge((h * scale).to(device), 5))
    assert torch.equal(group, want)


def test_group_merge_exact_ties_go_to_the_lowest_group(backend):
    """Parallel vectors are exactly tied in the mathematics: every backend puts them in the lowest group."""
    impl, device = backend
    g = _gen(61)
    base = torch.randn(4, 24, generator=g)
    # R = 12, Z = 4: targets are rows 0, 3, 6, 9; targets 0 and 2 (rows 0, 6) point the same way
    h = torch.randn(12, 24, generator=g)
    h[0], h[6] = base[0], 2.5 * base[0]
    h[1], h[2], h[4] = 0.7 * base[0], 3.0 * base[0], 1e-3 * base[0]
    h[3], h[9] = base[1], base[1] * 0.25  # targets 1 and 3 parallel too
    h[5], h[7] = 8.0 * base[1], -base[0]  # -base[0]: opposite to 0 and 2, tied at -1
    h = torch.stack([h, h.flip(0)])
    want = python_ref.group_merge(h, 4)[1]
    assert want[0, [1, 2, 4]].tolist() == [0, 0, 0] and want[0, 5] == 1
    _, group, _ = (t.cpu() for t in impl.group_merge(h.to(device), 4))
    assert torch.equal(group, want)
