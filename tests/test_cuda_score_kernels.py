"""The CUDA score and selection kernels (csrc/tv_score.cu, tv_score.cuh, score_select.cu,
select_rows.cuh, topk_select.cu) executed on the CPU through the emulation of tests/cuda_emu, on the code paths the backend protocol tests do
not reach: several merge CTAs per row whose last one selects (under every block order and several
thread schedules, so the last CTA differs from run to run), key tiles over 64 keys with prefetched
batches, sub-warp key groups for every head dim and load width, GQA groups, padding masks over keys
whose K rows hold NaN and inf, a reused workspace whose arrival counters must be reset by the op, the
1024-thread select with its candidate list, its overflow and its streamed keys, and a copy of the
kernels without the counter reset, which these tests must catch."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cuda_emulator
import python_ref
from conftest import DTYPES

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulation compiles csrc/ with g++")
FP32_ULP = 2.0 ** -23


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.backend()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(B, H, Hkv, L, D, dtype, seed, aligned=True, pad=True):
    """q, k (aligned: contiguous; else a view one element into a wider buffer: 16-byte loads are
    impossible), and a mask with left padding in sample 1 and right padding plus a hole in sample 2."""
    g = _gen(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    if aligned:
        k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    else:
        k = torch.randn(B, Hkv, L, D + 1, generator=g).to(dtype)[..., 1:]
    mask = None
    if pad:
        mask = torch.ones(B, L, dtype=torch.bool)
        if B > 1:
            mask[1, :7] = False
        if B > 2:
            mask[2, L - 5:] = False
            mask[2, 3] = False
    return q, k, mask


def _exact(q, k, vis_start, vis_len, scale, mask):
    """tv_score in float64 (the truth the fp32 kernels are measured against)."""
    B, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    logits = torch.matmul(q.double().reshape(B, Hkv, H // Hkv, D), k.double().transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        probs = torch.where(mask.any(-1)[:, None, None, None], probs, 0.0)
    mean = probs.reshape(B, H, L).mean(1)
    pos = vis_start.long()[:, None] + torch.arange(vis_len)
    inside = (pos >= 0) & (pos < L)
    return torch.where(inside, torch.gather(mean, 1, pos.clamp(0, L - 1)), torch.zeros((), dtype=torch.float64))


def _assert_accurate(got, q, k, vis_start, vis_len, scale, mask):
    """Within 2x python_ref's fp32 error against float64, plus 4 fp32 ulps of the largest score (as
    tests/test_backends.py)."""
    exact = _exact(q, k, vis_start, vis_len, scale, mask)
    ref = python_ref.tv_score(q, k, vis_start, vis_len, scale, mask)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 4 * FP32_ULP * exact.abs().max().item(), f"error {err:.3g}, python_ref's {ref_err:.3g}"


def _assert_selection(keep_idx, rest_idx, scores, keep):
    """Exactly python_ref's selection of the kernel's own scores."""
    want_keep, want_rest = python_ref.topk_select(scores, keep)
    assert keep_idx.dtype == rest_idx.dtype == torch.int64
    assert torch.equal(keep_idx, want_keep) and torch.equal(rest_idx, want_rest)


# (B, H, Hkv, L, D, vis_len): GQA groups 1, 4, 7; head dims 16, 33, 64, 128; every shape has 2 to 5
# merge CTAs per row (64 positions per CTA from 17 heads on, 128 from 9) and L not a multiple of 64.
SHAPES = [(3, 28, 4, 203, 128, 150), (3, 16, 4, 333, 64, 300), (2, 32, 32, 150, 16, 130), (3, 20, 20, 100, 33, 90)]
SHAPE_IDS = ["G7-D128", "G4-D64", "G1-D16", "G1-D33"]


@pytest.mark.parametrize("aligned", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_score_select_several_ctas_per_row_in_every_block_order(emu, shape, dtype, aligned):
    """The merge CTAs of a row finish in launch order, in reverse, or shuffled (a different last CTA
    per row and run): the last one's selection and every score are the same each time, and right."""
    B, H, Hkv, L, D, vis_len = shape
    q, k, mask = _inputs(B, H, Hkv, L, D, dtype, seed=sum(shape), aligned=aligned)
    vis_start = torch.tensor([0, L - vis_len, 9][:B])  # a different span per sample
    keep = vis_len // 3
    scale = D ** -0.5
    results = []
    for order, seed in [("forward", 1), ("reverse", 1), ("random", 5), ("random", 11)]:
        with cuda_emulator.block_order(order, seed=seed):
            results.append(emu.score_select(q, k, vis_start, vis_len, keep, scale, mask))
    keep_idx, rest_idx, scores = results[0]
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(other, results[0]))
    _assert_accurate(scores, q, k, vis_start, vis_len, scale, mask)
    _assert_selection(keep_idx, rest_idx, scores, keep)
    assert torch.equal(emu.tv_score(q, k, vis_start, vis_len, scale, mask), scores)  # the same merge


@pytest.mark.parametrize("schedule", ["reverse", "random", "warps"])
def test_score_select_thread_schedules_with_shuffled_blocks(emu, schedule):
    """Threads in another order inside every block, blocks shuffled: bit-identical results."""
    q, k, mask = _inputs(3, 28, 4, 203, 128, torch.bfloat16, seed=3)
    vis_start = torch.tensor([5, 40, 0])
    args = (q, k, vis_start, 150, 50, 128 ** -0.5, mask)
    want = emu.score_select(*args)
    with cuda_emulator.schedule(schedule, seed=4), cuda_emulator.block_order("random", seed=2):
        got = emu.score_select(*args)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("keep", [0, 1, 77, 129, 130])
def test_score_select_keep_none_to_all(emu, keep):
    q, k, mask = _inputs(2, 32, 32, 150, 16, torch.float16, seed=keep)
    vis_start = torch.tensor([20, 3])
    k[:, :, 30] = k[:, :, 31]  # equal keys: tied scores in sample 0
    with cuda_emulator.block_order("random", seed=keep + 1):
        keep_idx, rest_idx, scores = emu.score_select(q, k, vis_start, 130, keep, 0.25, mask)
    _assert_selection(keep_idx, rest_idx, scores, keep)
    _assert_accurate(scores, q, k, vis_start, 130, 0.25, mask)


def test_masked_keys_holding_nan_and_inf_do_not_leak(emu):
    """Masked keys are read like the others (no load waits for a mask byte) and replaced by -inf: NaN
    and inf in their K rows change nothing."""
    q, k, mask = _inputs(3, 16, 4, 333, 64, torch.float32, seed=8)
    k[1, :, :7] = float("nan")  # left padding
    k[2, 0, 3, 5] = float("inf")  # the hole
    k[2, 2, 330] = float("-inf")  # right padding
    vis_start = torch.tensor([0, 0, 20])
    keep_idx, rest_idx, scores = emu.score_select(q, k, vis_start, 300, 100, 0.125, mask)
    assert not scores.isnan().any()
    _assert_accurate(scores, q, k, vis_start, 300, 0.125, mask)
    _assert_selection(keep_idx, rest_idx, scores, 100)


def test_nan_and_inf_of_valid_keys_follow_torch_softmax(emu):
    """A NaN query head, an inf key and an all-(-inf) head, each in its own sample, across several CTAs
    per row: NaN scores exactly where python_ref has them, selections exact; a sample without a valid
    key scores 0."""
    q, k, mask = _inputs(4, 20, 20, 100, 33, torch.float32, seed=12, pad=False)
    mask = torch.ones(4, 100, dtype=torch.bool)
    mask[3] = False
    q[0, 5, 2] = float("nan")
    q[1, 7, 0], k[1, 7, 40, 0] = 1.0, float("inf")  # a +inf logit
    q[2, 11] = float("inf")
    k[2, 11] = -k[2, 11].abs() - 1  # every logit of head 11 in sample 2 is -inf
    vis_start = torch.tensor([0, 5, 10, 2])
    want_keep, want_rest, want = python_ref.score_select(q, k, vis_start, 90, 30, 0.3, mask)
    with cuda_emulator.block_order("random", seed=9):
        keep_idx, rest_idx, got = emu.score_select(q, k, vis_start, 90, 30, 0.3, mask)
    assert torch.equal(got.isnan(), want.isnan())
    assert got[:3].isnan().all() and torch.equal(got[3], torch.zeros(90))
    assert torch.equal(keep_idx, want_keep) and torch.equal(rest_idx, want_rest)


def test_key_tiles_over_64_keys(emu):
    """1024 pass-1 blocks at 256-key tiles: 16 steps of 16 keys, prefetched 4 at a time."""
    q, k, mask = _inputs(2, 32, 32, 4100, 128, torch.bfloat16, seed=21)
    vis_start = torch.tensor([100, 3000])
    keep_idx, rest_idx, scores = emu.score_select(q, k, vis_start, 1000, 333, 128 ** -0.5, mask)
    _assert_accurate(scores, q, k, vis_start, 1000, 128 ** -0.5, mask)
    _assert_selection(keep_idx, rest_idx, scores, 333)


# ---------------------------------------------------------------- the workspace and its counters

def _garbage_workspace(n, seed):
    """Float32 workspace whose bits are random: counters start anywhere."""
    return torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=_gen(seed), dtype=torch.int64).to(torch.int32) \
        .view(torch.float32)


def test_a_reused_workspace_gives_identical_results(emu):
    """The same workspace, full of garbage, for several calls (as a CUDA graph replays them): pass 1
    resets every row's arrival counter, so each call selects, and identically."""
    q, k, mask = _inputs(3, 28, 4, 203, 128, torch.bfloat16, seed=30)
    vis_start = torch.tensor([1, 53, 20])
    ops = torch.ops.swiftvlm
    fresh = ops.score_select_cuda(q, k, vis_start, 150, 60, 0.1, mask)
    workspace = _garbage_workspace(1 << 16, seed=1)
    for order in ["forward", "random", "reverse"]:
        with cuda_emulator.block_order(order, seed=3):
            got = ops.score_select_cuda(q, k, vis_start, 150, 60, 0.1, mask, workspace)
        assert all(torch.equal(x, y) for x, y in zip(got, fresh))
        assert torch.equal(ops.tv_score_cuda(q, k, vis_start, 150, 0.1, mask, workspace), fresh[2])


@pytest.mark.skipif(os.environ.get("SWIFTVLM_EMU_SANITIZE") == "1",
                    reason="the sanitizer build aborts in ASan's __cxa_throw interceptor on the op's error")
def test_a_too_small_workspace_is_refused(emu):
    q, k, mask = _inputs(1, 4, 2, 30, 8, torch.float32, seed=31, pad=False)
    with pytest.raises(RuntimeError, match="workspace: expected a contiguous float32 tensor of at least"):
        torch.ops.swiftvlm.score_select_cuda(q, k, torch.tensor([2]), 20, 5, 0.1, None, torch.zeros(10))


@pytest.mark.slow  # a check of the harness itself: one more emulation build of a broken kernel
def test_a_kernel_without_the_counter_reset_fails_these_tests(tmp_path):
    """csrc/ copied without pass 1's reset of the arrival counters, built and run in a fresh process:
    on a garbage workspace, or on a workspace used once already, no CTA of a row sees itself last, no
    selection is written, and the results differ from python_ref's."""
    broken = tmp_path / "csrc"
    shutil.copytree(cuda_emulator.CSRC, broken)
    source = (broken / "tv_score.cu").read_text()
    reset = "if (tid == 0 && g == 0 && tile == 0) ws.arrivals[b] = 0;"
    assert reset in source, "the counter reset this test removes has moved: update the test"
    (broken / "tv_score.cu").write_text(source.replace(reset, ""))
    lib = cuda_emulator.build(str(broken), sanitize=False, tag="broken-reset-")
    script = f"""
import os, sys, torch
sys.path.insert(0, {os.path.join(cuda_emulator.ROOT, 'tests')!r})
import cuda_emulator, python_ref
cuda_emulator.load({lib!r})
ops = torch.ops.swiftvlm
g = torch.Generator().manual_seed(0)
q, k = torch.randn(2, 32, 16, generator=g), torch.randn(2, 32, 150, 16, generator=g)
for name, workspace in [("zeros", torch.zeros(1 << 16)), ("nan", torch.full((1 << 16,), float("nan")))]:
    for call in range(2):
        vis_start = torch.tensor([call, 20 + call])  # (results unlike any earlier call's)
        keep, rest, scores = ops.score_select_cuda(q, k, vis_start, 130, 40, 0.25, None, workspace)
        want_keep, want_rest = python_ref.topk_select(scores, 40)
        if not (torch.equal(keep, want_keep) and torch.equal(rest, want_rest)):
            print("caught:", name, "call", call, flush=True); os._exit(0)
print("not caught", flush=True); os._exit(1)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert "caught: zeros call 1" in run.stdout or "caught: nan call 0" in run.stdout, run.stdout + run.stderr[-2000:]


# ---------------------------------------------------------------- topk_select's paths

def _tied_scores(B, N, seed):
    """Scores on a coarse grid (many ties) with NaN, infinities and both zeros."""
    g = _gen(seed)
    s = torch.round(torch.randn(B, N, generator=g) * 8) / 8
    pick = torch.rand(B, N, generator=g)
    s[pick < 0.03] = float("nan")
    s[(pick >= 0.03) & (pick < 0.05)] = float("-inf")
    s[(pick >= 0.05) & (pick < 0.06)] = float("inf")
    s[(pick >= 0.06) & (pick < 0.1)] = -0.0
    return s


@pytest.mark.parametrize("N", [4096, 4097, 20000])
def test_topk_select_small_and_large_ctas(emu, N):
    """Rows up to 4096 scores run on 256 threads, longer ones on 1024 (several load batches at 20000)."""
    scores = _tied_scores(2, N, seed=N)
    for k in (1, N // 3, N - 1):
        keep, rest = emu.topk_select(scores, k)
        want_keep, want_rest = python_ref.topk_select(scores, k)
        assert torch.equal(keep, want_keep) and torch.equal(rest, want_rest), f"k={k}"


def test_topk_select_candidate_overflow_and_streamed_keys(emu):
    """40,000 scores of one top-12-bit bin (all in [1, 1.125)): more candidates than shared memory
    holds beside the keys, so digits 2 and 3 sweep every key; 60,000 scores: the keys themselves do not
    fit and are re-read from the row."""
    g = _gen(5)
    narrow = 1 + torch.randint(0, 1 << 20, (1, 40000), generator=g).float() * 2.0 ** -23
    wide = torch.randn(1, 60000, generator=g).to(torch.bfloat16)
    for scores, k in [(narrow, 12345), (wide, 20000), (wide, 1)]:
        keep, rest = emu.topk_select(scores, k)
        want_keep, want_rest = python_ref.topk_select(scores, k)
        assert torch.equal(keep, want_keep) and torch.equal(rest, want_rest)



def test_zero_head_dim_across_several_ctas_per_row(emu):
    """D == 0: one empty round of dots, every logit 0 (a uniform softmax), on a garbage workspace with
    several merge CTAs per row."""
    q = torch.randn(2, 32, 0)
    k = torch.randn(2, 32, 320, 0)
    vis_start = torch.tensor([0, 7])
    want = python_ref.tv_score(q, k, vis_start, 300, 0.25, None)
    workspace = _garbage_workspace(1 << 16, seed=40)
    with cuda_emulator.block_order("random", seed=6):
        keep_idx, rest_idx, got = torch.ops.swiftvlm.score_select_cuda(q, k, vis_start, 300, 100, 0.25, None,
                                                                       workspace)
    torch.testing.assert_close(got, want, rtol=0, atol=4 * FP32_ULP)
    _assert_selection(keep_idx, rest_idx, got, 100)
