"""attention_importance (python_ref, the cpu backend) against token-by-token brute force: GQA, the
low-rank selector's one head, masks and padding rows, several visual offsets, ragged batches (each
sample gives what it gives alone), edge cases; the cpu backend's row blocks against the reference.
The kernels (Triton, CUDA) run the backend protocol tests of test_backends.py (every backend against
float64: dtypes, odd shapes, GQA, masks, strided inputs, ragged samples alone, determinism, NaN);
here: the emulated CUDA kernels under other thread schedules and block orders, and both kernels at
real-model shapes (full tier)."""
import shutil

import pytest
import torch

import brute
import python_ref
import swiftvlm_kernels as sk
from conftest import DTYPES


def inputs(B, H, Hk, L, E, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, L, E, generator=g).to(dtype), torch.randn(B, Hk, L, E, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hk,L,E,n", [(2, 4, 2, 23, 8, 9), (1, 1, 1, 17, 5, 6), (3, 6, 3, 12, 16, 4),
                                          (2, 2, 2, 9, 3, 9), (2, 4, 1, 15, 7, 0)])
def test_against_brute_force(B, H, Hk, L, E, n, dtype):
    q, k = inputs(B, H, Hk, L, E, dtype, seed=L + E)
    vis_start = torch.tensor([0, L - n, 1][:B]).clamp(0, L - n)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[-1, :1] = False  # a left-padding row of the last sample
    for key_mask in (None, mask):
        got = python_ref.attention_importance(q, k, vis_start, n, 0.4, key_mask)
        want = brute.attention_importance(q, k, vis_start, n, 0.4, key_mask)
        for a, b in zip(got, want):
            assert a.dtype == torch.float32 and a.shape == (B, n)
            torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-7)
        for a, b in zip(sk.attention_importance(q, k, vis_start, n, 0.4, key_mask, backend="cpu"), got):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_cpu_row_blocks_give_the_reference(monkeypatch):
    import importlib

    cpu = importlib.import_module("swiftvlm_kernels.cpu.attention_importance")  # the module, not its function

    q, k = inputs(2, 4, 2, 40, 8, seed=3)
    want = python_ref.attention_importance(q, k, torch.tensor([5, 11]), 20, 0.3)
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4 * 2 * 4 * 40 * 3)  # blocks of 3 rows
    for a, b in zip(cpu.attention_importance(q, k, torch.tensor([5, 11]), 20, 0.3), want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_hand_computed():
    """One head, E = 1, q = k = 0: every row's softmax is uniform over its keys m <= j."""
    L, start, n = 5, 1, 2  # rows 0 (text), 1-2 (visual), 3-4 (text)
    q = torch.zeros(1, 1, L, 1)
    t2v, v2v = python_ref.attention_importance(q, q.clone(), torch.tensor([start]), n, 1.0)
    # text rows 0, 3, 4 give key 1: 0, 1/4, 1/5; key 2: 0, 1/4, 1/5  -> mean over 3 rows
    torch.testing.assert_close(t2v, torch.tensor([[(1 / 4 + 1 / 5) / 3] * 2]))
    # visual rows 1, 2 give key 1: 1/2, 1/3; key 2: 0, 1/3
    torch.testing.assert_close(v2v, torch.tensor([[(1 / 2 + 1 / 3) / 2, (1 / 3) / 2]]))


def test_ragged_samples_give_what_they_give_alone():
    q, k = inputs(3, 4, 2, 20, 8, seed=5)
    vis_start, counts = torch.tensor([2, 0, 7]), torch.tensor([9, 4, 0])
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, 3:7] = True
    vis_start[1] = 3
    for backend in ("torch", "cpu"):
        t2v, v2v = sk.attention_importance(q, k, vis_start, counts, 0.3, mask, max_vis_len=10, backend=backend)
        assert t2v.shape == v2v.shape == (3, 10)
        for b in range(3):
            n = int(counts[b])
            one = sk.attention_importance(q[b:b + 1], k[b:b + 1], vis_start[b:b + 1], n, 0.3, mask[b:b + 1],
                                          backend=backend)
            torch.testing.assert_close(t2v[b, :n], one[0][0], rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(v2v[b, :n], one[1][0], rtol=1e-6, atol=1e-8)
            assert not t2v[b, n:].any() and not v2v[b, n:].any()


def test_edge_cases():
    q, k = inputs(2, 2, 1, 6, 4, seed=7)
    # every row visual: no text row -> t2v 0; no visual token -> empty results
    t2v, v2v = python_ref.attention_importance(q, k, torch.tensor([0, 0]), 6, 0.5)
    assert not t2v.any() and v2v.all()
    empty = python_ref.attention_importance(q, k, torch.tensor([0, 3]), 0, 0.5)
    assert empty[0].shape == (2, 0)
    # a sample all padding: 0 everywhere
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0] = True
    t2v, v2v = python_ref.attention_importance(q, k, torch.tensor([1, 1]), 3, 0.5, mask)
    assert not t2v[1].any() and not v2v[1].any() and t2v[0].any()


def test_the_visual_rows_probabilities_sum_as_softmax_rows_do():
    """v2v summed over the visual keys, times the visual rows, is each visual row's probability mass on
    the visual keys: at most 1 per row and head, and exactly 1 for the first visual row when no text
    precedes the span."""
    q, k = inputs(1, 3, 3, 10, 6, seed=9)
    t2v, v2v = python_ref.attention_importance(q, k, torch.tensor([0]), 4, 0.5)
    mass = v2v.sum() * 4  # mean over 4 visual rows -> total
    assert mass <= 4 + 1e-5
    assert t2v.sum() * 6 <= 6 + 1e-5


def test_errors_name_the_argument():
    q, k = inputs(2, 4, 2, 10, 8)
    cases = [
        (lambda: sk.attention_importance(q[0], k, torch.tensor([0, 1]), 3), "^q: expected a 4-D tensor"),
        (lambda: sk.attention_importance(q, k[:, :, :9], torch.tensor([0, 1]), 3), "^k: expected 10 rows"),
        (lambda: sk.attention_importance(q, torch.randn(2, 3, 10, 8), torch.tensor([0, 1]), 3), "^k: expected a number"),
        (lambda: sk.attention_importance(q, k, torch.tensor([0, 8]), 3), "^vis_start: expected"),
        (lambda: sk.attention_importance(q, k, torch.tensor([0, 1]), 11), "^vis_len: expected"),
        (lambda: sk.attention_importance(q, k, torch.tensor([0, 1]), 3, key_mask=torch.ones(2, 10)), "^key_mask"),
        (lambda: sk.attention_importance(q, k, torch.tensor([0, 1]), torch.tensor([3, 11]), max_vis_len=10),
         "^vis_len: expected"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_fp64_evaluation_matches_the_loops():
    """brute.attention_importance_fp64 (the dense float64 form the kernels are measured against) equals
    the token-by-token loops, ragged and masked too."""
    q, k = inputs(3, 4, 2, 14, 5, seed=11)
    vis_start, counts = torch.tensor([2, 0, 9]), torch.tensor([6, 3, 5])
    mask = torch.ones(3, 14, dtype=torch.bool)
    mask[1, :2] = False
    mask[2, 4] = False
    for vis_len, width in ((counts, 6), (5, None)):
        want = brute.attention_importance(q, k, vis_start, vis_len, 0.7, mask)
        got = brute.attention_importance_fp64(q, k, vis_start, vis_len, 0.7, mask, width)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- the kernels: schedules, real shapes

needs_gpp = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulation compiles csrc/ with g++")


@pytest.fixture(scope="module")
def emu():
    import cuda_emulator

    return cuda_emulator.backend()


@needs_gpp
@pytest.mark.slow  # each schedule builds its own emulation (about 14 s): full tier
@pytest.mark.parametrize("schedule", ["reverse", "random", "warps"])
def test_cuda_emulated_kernels_under_every_schedule(emu, schedule):
    """Threads in other orders between barriers and blocks in a random order: bit-identical results (a
    missing barrier or a race would show), padded and ragged, GQA 7 and 20 (two head groups)."""
    import cuda_emulator

    q, k = inputs(3, 14, 2, 70, 40, torch.bfloat16, seed=12)
    q20, k20 = inputs(1, 20, 1, 50, 9, seed=13)
    mask = torch.ones(3, 70, dtype=torch.bool)
    mask[1, :6] = False
    mask[2, 33] = False
    vis_start, counts = torch.tensor([4, 10, 0]), torch.tensor([60, 9, 0])

    def run():
        return (*emu.attention_importance(q, k, vis_start, counts, 0.2, mask, 60),
                *emu.attention_importance(q, k, vis_start, 60, 0.2, mask),
                *emu.attention_importance(q20, k20, torch.tensor([7]), 30, 0.5, None))

    want = cuda_emulator.assert_schedule_independent(run, schedule)
    torch.testing.assert_close(want[0], python_ref.attention_importance(q, k, vis_start, counts, 0.2, mask, 60)[0],
                               rtol=1e-5, atol=1e-8)


def _module(name, emu_request):
    if name == "triton":
        import swiftvlm_kernels.triton_kernels as triton_kernels

        return triton_kernels
    return emu_request.getfixturevalue("emu")


def _llava_cases():
    """(backend, H, E): the selector's one head at rank 128 and 256 on both kernels, the layer's 32
    heads of 128 on the emulated CUDA kernels only (the Triton interpreter takes minutes there)."""
    import os

    emu_marks = [pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulation compiles csrc/ with g++")]
    backends = [("cuda-emu", emu_marks)] + ([("triton", [])] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    return [pytest.param(name, H, E, marks=marks, id=f"{name}-H{H}-E{E}") for name, marks in backends
            for H, E in ((1, 128), (1, 256), (32, 128)) if name != "triton" or H == 1]


@pytest.mark.slow
@pytest.mark.parametrize("backend,H,E", _llava_cases())
def test_llava_shapes(backend, H, E, request):
    """LLaVA-1.5: 576 visual tokens in a 650-token prompt, a batch of two, the second left padded:
    within python_ref's fp32 rounding."""
    module = _module(backend, request)
    q, k = inputs(2, H, H, 650, E, torch.bfloat16, seed=14)
    mask = torch.ones(2, 650, dtype=torch.bool)
    mask[1, :40] = False
    vis_start = torch.tensor([35, 75])
    got = module.attention_importance(q, k, vis_start, 576, E ** -0.5, mask)
    want = python_ref.attention_importance(q, k, vis_start, 576, E ** -0.5, mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-9)
