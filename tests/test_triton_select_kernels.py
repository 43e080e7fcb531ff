"""The Triton selection kernels' own paths (topk_select.py, tv_score.py, score_select.py).

topk_select selects a row in registers up to MAX_REGISTER_N scores (a counting search that
interpolates, halves, and snaps to key values after a stalled pass; keep / rest written from the
registers up to OUT_BLOCK scores, else in blocks), else in chunks (radix select);
score_select selects in the last scoring program of each sample, after an atomic count. These tests
drive every path: rows at and around the register limit (the real one and a small forced one, with
small chunks), ties at the threshold, NaN / inf / signed zeros, keep 0 and keep = N, strided
inputs, batches with different visual offsets, GQA, left padding, visual spans partly outside
[0, L), several scoring programs a sample. Selections must equal python_ref.topk_select of the
kernel's own scores exactly; scores must be as accurate as in tests/test_backends.py.
"""
import importlib
import math
import os

import pytest
import torch

import brute
import python_ref

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"
NAN, INF = math.nan, math.inf
FP32_ULP = 2.0 ** -23


def _modules():
    return (importlib.import_module("swiftvlm_kernels.triton_kernels.topk_select"),
            importlib.import_module("swiftvlm_kernels.triton_kernels.tv_score"),
            importlib.import_module("swiftvlm_kernels.triton_kernels.score_select"))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_topk(scores, k):
    topk = _modules()[0]
    keep, rest = topk.topk_select(scores.to(DEVICE), k)
    want_keep, want_rest = python_ref.topk_select(scores.cpu(), k)
    assert keep.dtype == rest.dtype == torch.int64
    assert torch.equal(keep.cpu(), want_keep), f"keep differs at k={k}"
    assert torch.equal(rest.cpu(), want_rest), f"rest differs at k={k}"


def _ks(N):
    return sorted({0, 1, N // 3, N // 2, N - 1, N} - {-1})


def _rows(N, seed):
    """Four rows of N scores: smooth, heavy ties on a coarse grid, special values, geometric spacing."""
    g = _gen(seed)
    smooth = torch.softmax(torch.randn(N, generator=g) * 3, 0)
    ties = torch.round(torch.randn(N, generator=g) * 1.5) / 2
    special = torch.randn(N, generator=g)
    pick = torch.rand(N, generator=g)
    special[pick < 0.1] = NAN
    special[(pick >= 0.1) & (pick < 0.15)] = -INF
    special[(pick >= 0.15) & (pick < 0.2)] = INF
    special[(pick >= 0.2) & (pick < 0.3)] = -0.0
    special[(pick >= 0.3) & (pick < 0.35)] = 0.0
    geometric = 2.0 ** -(torch.randperm(N, generator=g) % 100).float() * (1 + torch.rand(N, generator=g))
    return torch.stack([smooth, ties, special, geometric])


# ---------------------------------------------------------------- topk_select: register path and its limit

@pytest.mark.parametrize("N", [1, 2, 3, 127, 128, 129, 1000])
def test_register_path(N):
    for k in _ks(N):
        _check_topk(_rows(N, N), k)


def test_register_path_at_the_real_limit():
    topk = _modules()[0]
    N = topk.MAX_REGISTER_N
    assert topk.row_config(N)[1] and not topk.row_config(N + 1)[1]
    scores = _rows(N, 1)[[0, 2]]
    for k in (N // 3, N // 2):
        _check_topk(scores, k)


def test_chunked_path_past_the_real_limit():
    topk = _modules()[0]
    N = topk.MAX_REGISTER_N + 1
    _check_topk(_rows(N, 2)[[1]], N // 3)


@pytest.mark.parametrize("N", [63, 64, 65, 100, pytest.param(300, marks=pytest.mark.slow)])
def test_forced_small_register_limit(monkeypatch, N):
    """MAX_REGISTER_N = 64 and chunks of 32: rows of 65 and more take the chunked path, over several chunks."""
    topk = _modules()[0]
    monkeypatch.setattr(topk, "MAX_REGISTER_N", 64)
    monkeypatch.setattr(topk, "CHUNK", 32)
    assert topk.row_config(N)[1] == (N <= 64)
    for k in _ks(N):
        _check_topk(_rows(N, N), k)


@pytest.mark.parametrize("N", [65, 100, 300])
def test_register_path_blocked_output(monkeypatch, N):
    """OUT_BLOCK = 64: register-resident rows longer than it write keep / rest in blocks, re-reading the scores."""
    topk = _modules()[0]
    monkeypatch.setattr(topk, "OUT_BLOCK", 64)
    assert topk.row_config(N)[1]
    for k in _ks(N):
        _check_topk(_rows(N, N + 1), k)
    _check_topk(_rows(N, 5).t().contiguous().t(), N // 2)  # column-major


def test_many_equal_keys_at_the_threshold():
    """The k-th largest sits inside a long run of equal scores (at the start, middle and end of the row)."""
    N = 700
    for start in (0, 300, N - 200):
        s = torch.linspace(-1, 1, N)
        s[start:start + 200] = 0.25
        for k in (1, 150, 280, 350, 420, 699):
            _check_topk(torch.stack([s, s.flip(0), -s]), k)
    two_values = (torch.arange(N) % 7 == 0).float()  # only two distinct scores
    for k in (0, 50, 100, 101, 500, N):
        _check_topk(two_values[None], k)


@pytest.mark.parametrize("fill", [NAN, INF, -INF, 0.0, -0.0, 3.5])
def test_constant_rows(fill):
    s = torch.full((2, 300), fill)
    s[1, ::2] = -fill  # signed zeros, both infinities
    for k in (0, 1, 150, 300):
        _check_topk(s, k)


def test_special_value_rows():
    row = torch.tensor([1.0, NAN, 3.0, 3.0, -INF, 0.0, -0.0, 3.0, INF, NAN, -0.0, -1e-30, 1e-30, -INF])
    s = torch.stack([row, row.flip(0), torch.where(torch.isnan(row), -INF, row)])
    for k in range(len(row) + 1):
        _check_topk(s, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_ties(dtype):
    """fp16 / bf16 scores repeat values often: the snapping passes end on them."""
    s = torch.softmax(torch.randn(3, 2000, generator=_gen(4)), 1).to(dtype)
    for k in (1, 444, 666, 1999):
        _check_topk(s, k)


def test_strided_scores():
    base = _rows(600, 9)
    _check_topk(base.t().contiguous().t(), 200)  # column-major [4, 600]
    _check_topk(base[:, ::3], 77)  # every third score
    wide = torch.randn(600, 8, generator=_gen(3))
    _check_topk(wide.t()[1:6], 199)  # a transposed slice


def test_empty_and_tiny_rows():
    topk = _modules()[0]
    keep, rest = topk.topk_select(torch.zeros(3, 0, device=DEVICE), 0)
    assert keep.shape == (3, 0) and rest.shape == (3, 0)
    keep, rest = topk.topk_select(torch.zeros(0, 5, device=DEVICE), 2)
    assert keep.shape == (0, 2) and rest.shape == (0, 3)
    _check_topk(torch.tensor([[NAN], [2.0]]), 1)
    _check_topk(torch.tensor([[NAN], [2.0]]), 0)


# ---------------------------------------------------------------- tv_score / score_select

def _attention(B, H, Hkv, L, D, dtype, seed, pad=None):
    g = _gen(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    mask = None
    if pad is not None:
        mask = torch.ones(B, L, dtype=torch.bool)
        for b, n in enumerate(pad):
            mask[b, :n] = False  # left padding
    return q, k, mask


def _assert_scores_accurate(got, q, k, vis_start, vis_len, scale, mask):
    """As tests/test_backends.py: within 2x python_ref's error against float64, plus 4 fp32 ulps."""
    exact = brute.tv_score(q, k, vis_start, vis_len, scale, mask)
    ref = python_ref.tv_score(q, k, vis_start, vis_len, scale, mask)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    err = (got.cpu().double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 4 * FP32_ULP * exact.abs().max().item(), f"error {err:.3g} vs {ref_err:.3g}"


def _run_score_select(q, k, vis_start, vis_len, keep, scale, mask):
    _, tv, ss = _modules()
    on = [None if t is None else t.to(DEVICE) for t in (q, k, vis_start, mask)]
    keep_idx, rest_idx, scores = ss.score_select(on[0], on[1], on[2], vis_len, keep, scale, on[3])
    want_keep, want_rest = python_ref.topk_select(scores.cpu(), keep)
    assert keep_idx.dtype == rest_idx.dtype == torch.int64
    assert torch.equal(keep_idx.cpu(), want_keep) and torch.equal(rest_idx.cpu(), want_rest)
    _assert_scores_accurate(scores, q, k, vis_start, vis_len, scale, mask)
    alone = tv.tv_score(on[0], on[1], on[2], vis_len, scale, on[3])
    _assert_scores_accurate(alone, q, k, vis_start, vis_len, scale, mask)
    return keep_idx, rest_idx, scores


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2), (7, 1)], ids=["G1", "G4", "G7"])
def test_score_select_gqa_batch_offsets_padding(H, Hkv):
    """B = 3 with different visual offsets and left padding, the visual span partly outside [0, L)
    in two samples (before 0, past L), GQA groups of 1, 4 and 7."""
    B, L, D, vis_len = 3, 45, 16, 30
    q, k, mask = _attention(B, H, Hkv, L, D, torch.bfloat16, seed=H, pad=(0, 6, 11))
    vis_start = torch.tensor([-7, 9, 30])
    for keep in (0, 1, 10, 29, 30):
        _run_score_select(q, k, vis_start, vis_len, keep, D ** -0.5, mask)


@pytest.mark.parametrize("forced_limit", ["none", "output", "chunked"])
def test_score_select_several_programs_a_sample(monkeypatch, forced_limit):
    """Small score tiles: several programs score each sample and the last to finish selects, on the
    row in registers (its keep / rest written from registers or, forced, in blocks) or (forced limit)
    in chunks."""
    topk, tv, _ = _modules()
    monkeypatch.setattr(tv, "SCORE_TILE", 1)  # [BLOCK_H, BLOCK_V] tiles of one logit a thread
    if forced_limit == "output":
        monkeypatch.setattr(topk, "OUT_BLOCK", 32)
    if forced_limit == "chunked":
        monkeypatch.setattr(topk, "MAX_REGISTER_N", 32)
        monkeypatch.setattr(topk, "CHUNK", 16)
    B, H, Hkv, L, D, vis_len = 2, 8, 4, 200, 8, 150
    q, k, mask = _attention(B, H, Hkv, L, D, torch.float32, seed=7, pad=(0, 20))
    k[:, :, 40] = k[:, :, 60]  # equal keys: tied scores
    vis_start = torch.tensor([30, 50])
    assert _programs_a_sample(H, vis_len) > 1
    for keep in (0, 49, 100, 150):
        _run_score_select(q, k, vis_start, vis_len, keep, 0.4, mask)


def _programs_a_sample(H, vis_len):
    """Programs of score_select's launch 2 a sample: the score tiles of its row."""
    from swiftvlm_kernels.triton_kernels._common import pow2

    topk, tv, _ = _modules()
    block_v = min(pow2(vis_len), max(1, tv.SCORE_TILE * 32 * topk.row_config(vis_len)[2] // pow2(H)))
    return -(-vis_len // block_v)


def test_score_select_special_values_and_no_valid_key():
    """NaN in a query head (that sample's scores are NaN, ranked lowest: kept by index), a sample
    without a valid key (scores 0: the first keep indices), +inf in a key."""
    B, H, Hkv, L, D, vis_len = 3, 4, 2, 40, 8, 25
    q, k, mask = _attention(B, H, Hkv, L, D, torch.float32, seed=5, pad=(0, 40, 3))
    q[0, 1, 2] = NAN
    k[2, 0, 20, 0] = INF
    vis_start = torch.tensor([10, 5, 12])
    keep_idx, rest_idx, scores = _modules()[2].score_select(q.to(DEVICE), k.to(DEVICE), vis_start.to(DEVICE),
                                                             vis_len, 9, 0.3, mask.to(DEVICE))
    want_keep, want_rest, want = python_ref.score_select(q, k, vis_start, vis_len, 9, 0.3, mask)
    scores = scores.cpu()
    assert torch.equal(scores.isnan(), want.isnan()) and torch.all(scores[1] == 0)
    torch.testing.assert_close(scores.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-7)
    assert torch.equal(keep_idx.cpu(), want_keep) and torch.equal(rest_idx.cpu(), want_rest)
    assert keep_idx[0].tolist() == list(range(9)) and keep_idx[1].tolist() == list(range(9))


def test_score_select_strided_inputs_and_repeat():
    """Keys as a [B, L, Hkv, 2D] projection viewed as [B, Hkv, L, D], every other feature; a
    transposed query; int32 offsets. A second call gives the same bits (the done counters reset)."""
    B, H, Hkv, L, D, vis_len = 2, 6, 3, 37, 8, 20
    g = _gen(8)
    k = torch.randn(B, L, Hkv, 2 * D, generator=g).to(DEVICE).transpose(1, 2)[..., ::2]
    q = torch.randn(B, D, H, generator=g).to(DEVICE).transpose(1, 2)
    vis_start = torch.tensor([3, 17], dtype=torch.int32)
    first = _run_score_select(q.cpu(), k.cpu(), vis_start, vis_len, 7, 0.5, None)
    second = _modules()[2].score_select(q, k, vis_start.to(DEVICE), vis_len, 7, 0.5, None)
    for a, b in zip(first, second):
        assert torch.equal(a.cpu(), b.cpu())


def test_empty_shapes():
    """vis_len = 0 and B = 0 return empty results without launching."""
    _, tv, ss = _modules()
    q, k, _ = _attention(2, 4, 2, 10, 8, torch.float32, seed=1)
    assert tv.tv_score(q.to(DEVICE), k.to(DEVICE), torch.tensor([0, 1], device=DEVICE), 0, 0.5).shape == (2, 0)
    keep_idx, rest_idx, scores = ss.score_select(q[:0].to(DEVICE), k[:0].to(DEVICE),
                                                 torch.zeros(0, dtype=torch.int64, device=DEVICE), 5, 2, 0.5)
    assert keep_idx.shape == (0, 2) and rest_idx.shape == (0, 3) and scores.shape == (0, 5)
