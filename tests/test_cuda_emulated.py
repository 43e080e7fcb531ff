"""The CUDA kernels of csrc/ executed on the CPU through the emulation of tests/cuda_emu (the backend
protocol tests run them too, as the `cuda-emu` backend of test_backends.py): here, every thread
schedule gives the same results, the real-model shapes, the emulator's own checks, and a kernel with a
barrier removed failing the tests."""
import ctypes
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import cuda_emulator
import python_ref

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulation compiles csrc/ with g++")


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.backend()


def _attention(B, H, Hkv, L, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, D, generator=g).to(dtype), torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[-1, :3] = False
    return q, k, mask


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random", "warps"])
def test_every_schedule_gives_the_same_results(emu, schedule):
    """Threads in another order between barriers: the results stay bit-identical (a missing barrier
    or a race would show as a difference under some order)."""
    q, k, mask = _attention(3, 8, 2, 150, 64, seed=1, dtype=torch.bfloat16)
    vis_start = torch.tensor([3, 20, 11])
    h = torch.randn(2, 90, 48, generator=torch.Generator().manual_seed(2))
    scores = torch.randn(2, 1500, generator=torch.Generator().manual_seed(3)).round(decimals=1)  # many ties
    with cuda_emulator.schedule("forward"):
        want = (emu.score_select(q, k, vis_start, 120, 40, 0.125, mask), emu.topk_select(scores, 300),
                emu.group_merge(h, 7))
    with cuda_emulator.schedule(schedule, seed=7):
        got = (emu.score_select(q, k, vis_start, 120, 40, 0.125, mask), emu.topk_select(scores, 300),
               emu.group_merge(h, 7))
    assert torch.equal(want[1][0], python_ref.topk_select(scores, 300)[0])
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert torch.equal(x, y), schedule


@pytest.mark.parametrize("schedule", ["reverse", "random", "warps"])
def test_ragged_batches_under_every_schedule(emu, schedule):
    """The ragged forms (per-sample counts read on the device, -1 / zero padding written beside the
    select, compact.ragged's per-CTA counts) give the same results under other thread schedules and
    a random block order, and the packed form equals the padded one."""
    q, k, mask = _attention(3, 8, 2, 150, 64, seed=11, dtype=torch.bfloat16)
    vis_start, vis_len, keep = torch.tensor([3, 20, 0]), torch.tensor([120, 77, 0]), torch.tensor([40, 77, 0])
    scores = torch.randn(3, 1500, generator=torch.Generator().manual_seed(12)).round(decimals=1)  # many ties
    lengths, k_rows = torch.tensor([1500, 999, 0]), torch.tensor([300, 999, 0])
    h = torch.randn(3, 90, 48, generator=torch.Generator().manual_seed(13))
    rows, groups = torch.tensor([90, 41, 0]), torch.tensor([7, 3, 0])
    cu = torch.tensor([0, 150, 150 + 130, 150 + 130 + 97], dtype=torch.int32)
    packed_k = torch.cat([k[0].transpose(0, 1), k[1, :, :130].transpose(0, 1), k[2, :, :97].transpose(0, 1)])

    def run():
        keep_idx, rest_idx, sc = emu.score_select(q, k, vis_start, vis_len, keep, 0.125, mask, 120, 77)
        block = python_ref.topk_select(sc, keep, vis_len, 77)
        assert torch.equal(keep_idx, block[0]) and torch.equal(rest_idx, block[1])
        compacted = emu.compact(h[:, :, :16].repeat(1, 2, 1)[:, :150], vis_start, keep_idx, rest_idx,
                                torch.tensor([4, 0, 0]), 5)
        packed = emu.score_select_varlen(q, packed_k, cu, vis_start, torch.tensor([120, 77, 60]),
                                         torch.tensor([40, 7, 60]), 0.125, 120, 60, 150)
        return (keep_idx, rest_idx, sc, *emu.topk_select(scores, k_rows, lengths, 999),
                *emu.group_merge(h, groups, rows, 7), *compacted, *packed)

    want = cuda_emulator.assert_schedule_independent(run, schedule)
    k_padded, key_mask = python_ref.varlen.unpack(packed_k, cu, 150)
    padded = emu.score_select(q, k_padded, vis_start, torch.tensor([120, 77, 60]), torch.tensor([40, 7, 60]), 0.125,
                              key_mask, 120, 60)
    for a, b in zip(want[-3:], padded):
        assert torch.equal(a, b)
    reference = python_ref.compact(h[:, :, :16].repeat(1, 2, 1)[:, :150], vis_start, want[0], want[1],
                                   torch.tensor([4, 0, 0]), 5)
    for a, b in zip(want[-8:-3], reference):
        assert torch.equal(a, b)


def test_llava_shape_score_select(emu):
    """LLaVA-1.5 batch 1: 576 visual tokens in a 650-token prompt, 32 heads of 128, keep 192."""
    q, k, mask = _attention(1, 32, 32, 650, 128, seed=3, dtype=torch.bfloat16)
    vis_start = torch.tensor([35])
    keep, rest, scores = emu.score_select(q, k, vis_start, 576, 192, 128 ** -0.5, None)
    want = python_ref.tv_score(q, k, vis_start, 576, 128 ** -0.5)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-8)
    want_keep, want_rest = python_ref.topk_select(scores, 192)  # exact on the kernel's own scores
    assert torch.equal(keep, want_keep) and torch.equal(rest, want_rest)


def test_llava_shape_ragged_score_select(emu):
    """A ragged LLaVA-1.5 batch: 576 and 300 visual tokens (the second sample's prompt shorter, left
    padded), 32 heads of 128, keep 192 and 100 in one call: each row bit-equal to its sample alone,
    padded with 0 scores and -1 indices, its selection exact on its own scores."""
    q, k, _ = _attention(2, 32, 32, 650, 128, seed=5, dtype=torch.bfloat16)
    mask = torch.ones(2, 650, dtype=torch.bool)
    mask[1, :276] = False  # sample 1: 374 tokens, its 300 visual ones from 311
    vis_start, vis_len, keep = torch.tensor([35, 311]), torch.tensor([576, 300]), torch.tensor([192, 100])
    scale = 128 ** -0.5
    keep_idx, rest_idx, scores = emu.score_select(q, k, vis_start, vis_len, keep, scale, mask, 576, 192)
    assert keep_idx.shape == (2, 192) and rest_idx.shape == scores.shape == (2, 576)
    want = python_ref.tv_score(q, k, vis_start, vis_len, scale, mask, 576)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-8)
    assert torch.equal(emu.tv_score(q, k, vis_start, vis_len, scale, mask, 576), scores)
    for b in range(2):
        n, kb = int(vis_len[b]), int(keep[b])
        one = emu.score_select(q[b:b + 1], k[b:b + 1], vis_start[b:b + 1], n, kb, scale, mask[b:b + 1])
        assert torch.equal(scores[b, :n], one[2][0]) and not scores[b, n:].any()
        assert torch.equal(keep_idx[b, :kb], one[0][0]) and (keep_idx[b, kb:] == -1).all()
        assert torch.equal(rest_idx[b, :n - kb], one[1][0]) and (rest_idx[b, n - kb:] == -1).all()
        own_keep, own_rest = python_ref.topk_select(scores[b:b + 1, :n], kb)
        assert torch.equal(keep_idx[b, :kb], own_keep[0]) and torch.equal(rest_idx[b, :n - kb], own_rest[0])


def test_llava_next_shape_ragged_compact(emu):
    """compact.ragged at LLaVA-NeXT widths (blocks of 2880 slots, samples with 2880, 1512 and 0 visual
    tokens; the id prefixes found in several search rounds) equals python_ref (small d keeps it quick)."""
    vis_len, keep, merge = torch.tensor([2880, 1512, 0]), torch.tensor([960, 504, 0]), torch.tensor([96, 50, 0])
    h = torch.randn(3, 2954, 8, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    vis_start = torch.tensor([35, 35, 35])
    keep_idx, rest_idx = python_ref.topk_select(torch.randn(3, 2880, generator=torch.Generator().manual_seed(7)), keep,
                                                vis_len, 960)
    got = emu.compact(h, vis_start, keep_idx, rest_idx, merge, 97)
    for a, b in zip(got, python_ref.compact(h, vis_start, keep_idx, rest_idx, merge, 97)):
        assert torch.equal(a, b)


def test_llava_shape_group_merge(emu):
    """LLaVA-1.5: the 432 rest tokens of keep 144 merged into 22 groups at d = 4096."""
    h = torch.randn(1, 432, 4096, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    merged, group, counts = emu.group_merge(h, 22)
    want_merged, want_group, want_counts = python_ref.group_merge(h, 22)
    assert torch.equal(group, want_group) and torch.equal(counts, want_counts)
    torch.testing.assert_close(merged.float(), want_merged.float(), rtol=2 ** -7, atol=1e-6)


# ---------------------------------------------------------------- the emulator's own checks

@pytest.fixture(scope="module")
def selftest():
    lib = ctypes.CDLL(cuda_emulator.build_selftest())
    lib.swiftvlm_emu_message.restype = ctypes.c_char_p
    return lib


def _run(lib, name, *args, threads=64):
    out = (ctypes.c_int * 2048)()
    code = getattr(lib, name)(out, *args)
    return code, lib.swiftvlm_emu_message().decode(), list(out[:threads])


def test_a_barrier_not_reached_by_every_thread_fails_loudly(selftest):
    code, message, _ = _run(selftest, "swiftvlm_emu_exits_before_barrier")
    assert code != 0 and "__syncthreads() not reached by every thread" in message and "thread 5" in message


def test_a_shuffle_naming_absent_or_exited_lanes_fails_loudly(selftest):
    code, message, _ = _run(selftest, "swiftvlm_emu_partial_warp_shuffle")
    assert code != 0 and "does not exist" in message
    code, message, _ = _run(selftest, "swiftvlm_emu_shuffle_after_exit")
    assert code != 0 and "has exited" in message


def test_shared_memory_and_block_limits(selftest):
    assert _run(selftest, "swiftvlm_emu_dynamic_smem", 48 * 1024, 0)[0] == 0
    code, message, _ = _run(selftest, "swiftvlm_emu_dynamic_smem", 64 * 1024, 0)
    assert code != 0 and "48 KB without cudaFuncSetAttribute" in message
    assert _run(selftest, "swiftvlm_emu_dynamic_smem", 64 * 1024, 64 * 1024)[0] == 0  # opted in
    code, message, _ = _run(selftest, "swiftvlm_emu_dynamic_smem", 300 * 1024, 300 * 1024)
    assert code != 0 and "exceed the opt-in limit" in message
    code, message, _ = _run(selftest, "swiftvlm_emu_block_size", 2048)
    assert code != 0 and "1 to 1024" in message


def test_a_missing_barrier_shows_under_the_reverse_schedule(selftest):
    assert _run(selftest, "swiftvlm_emu_publish", 1)[2] == [42] * 64
    with _schedule(selftest, "reverse"):
        assert _run(selftest, "swiftvlm_emu_publish", 1)[2] == [42] * 64
        racy = _run(selftest, "swiftvlm_emu_publish", 0)[2]
    assert racy != [42] * 64  # readers that ran before the writer saw the old value


class _schedule:
    def __init__(self, lib, name):
        self.lib, self.name = lib, name

    def __enter__(self):
        self.lib.swiftvlm_emu_set_schedule(cuda_emulator.SCHEDULES[self.name], 1)

    def __exit__(self, *exc):
        self.lib.swiftvlm_emu_set_schedule(0, 1)


def _tickets(lib, order="schedule", seed=1, blocks=40):
    lib.swiftvlm_emu_set_block_order(cuda_emulator.BLOCK_ORDERS[order], seed)
    try:
        code, message, out = _run(lib, "swiftvlm_emu_block_tickets", blocks, threads=blocks)
    finally:
        lib.swiftvlm_emu_set_block_order(0, 1)
    assert code == 0, message
    return out


def test_block_orders(selftest):
    """Blocks run in launch order, reversed (also under the reverse thread schedule), or in a seeded
    random permutation that changes with the seed and from one launch to the next."""
    forward = list(range(40))
    assert _tickets(selftest) == forward and _tickets(selftest, "forward") == forward
    assert _tickets(selftest, "reverse") == forward[::-1]
    with _schedule(selftest, "reverse"):
        assert _tickets(selftest) == forward[::-1]
        assert _tickets(selftest, "forward") == forward  # an explicit order wins over the schedule's
    shuffled = _tickets(selftest, "random", seed=3)
    assert sorted(shuffled) == forward and shuffled != forward and shuffled != forward[::-1]
    assert _tickets(selftest, "random", seed=3) == shuffled  # reproducible
    assert _tickets(selftest, "random", seed=4) != shuffled
    selftest.swiftvlm_emu_set_block_order(cuda_emulator.BLOCK_ORDERS["random"], 3)
    try:  # a new permutation per launch
        first, second = (_run(selftest, "swiftvlm_emu_block_tickets", 40, threads=40)[2] for _ in range(2))
    finally:
        selftest.swiftvlm_emu_set_block_order(0, 1)
    assert first == shuffled and second != first


# ---------------------------------------------------------------- a broken kernel fails the tests

# (file, the barrier to remove): one in the radix select, one in the block-wide scan
BROKEN = [("select_rows.cuh", "for (int b = tid; b < kDigitBins; b += THREADS) sh.hist[b] = 0;\n    __syncthreads();"),
          ("common.cuh", "if (lane == kWarp - 1) scratch[warp] = incl;\n  __syncthreads();")]


@pytest.mark.slow  # a check of the harness itself: one more emulation build per broken kernel
@pytest.mark.parametrize("file, barrier", BROKEN, ids=["select-histogram", "block-scan"])
def test_removing_a_syncthreads_makes_the_kernels_fail(tmp_path, file, barrier):
    """csrc/ copied with one __syncthreads() removed, built and run in a fresh process (its ops share
    the real ones' names) under every schedule: some schedule gives python_ref's results no more, the
    emulator stops the launch, or the kernel's wrong indices write out of bounds and kill the process."""
    broken = tmp_path / "csrc"
    shutil.copytree(cuda_emulator.CSRC, broken)
    source = (broken / file).read_text()
    assert barrier in source, "the barrier this test removes has moved: update BROKEN"
    (broken / file).write_text(source.replace(barrier, re.sub(r"\s*__syncthreads\(\);", "", barrier), 1))
    lib = cuda_emulator.build(str(broken), sanitize=False, tag="broken-")
    script = f"""
import os, sys, torch
sys.path.insert(0, {os.path.join(cuda_emulator.ROOT, 'tests')!r})
import cuda_emulator, python_ref
emu = cuda_emulator.backend({lib!r})
scores = torch.randn(4, 3000, generator=torch.Generator().manual_seed(0))
want = python_ref.topk_select(scores, 1000)
for name in cuda_emulator.SCHEDULES:
    with cuda_emulator.schedule(name, seed=3):
        try:
            got = emu.topk_select(scores, 1000)
        except RuntimeError as e:
            print("caught:", name, str(e).splitlines()[0], flush=True); os._exit(0)
    if not all(torch.equal(a, b) for a, b in zip(got, want)):
        print("caught:", name, "wrong result", flush=True); os._exit(0)  # (its stray writes may crash teardown)
print("not caught", flush=True); os._exit(1)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    # caught: a wrong result, a failed launch, or the broken kernel's stray writes killing the process
    assert "not caught" not in run.stdout and ("caught:" in run.stdout or run.returncode < 0), \
        run.stdout + run.stderr[-2000:]
