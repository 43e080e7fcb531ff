"""Tensor-parallel scoring (swiftvlm_kernels/distributed.py) under torch.distributed's gloo backend on
CPU, 2 and 4 ranks in spawned processes: every rank keeps the same tokens as every other rank and as
one rank with all heads; scores equal the single-rank ones within fp32 rounding; GQA with KV heads
sharded (W divides Hkv) and replicated (Hkv < W), padding, ragged batches, exact ties, and the
engine's stages (select, merge, restore) with a process group."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swiftvlm_kernels import ops
from swiftvlm_kernels.distributed import shard_heads, tp_score_select, tp_tv_score
from swiftvlm_kernels.pruning import PruningEngine, PruningPlan, RaggedPlan, Sequence, Stage, SwiftVLM

B, L, D, N_V = 3, 26, 8, 12
VIS_START = torch.tensor([2, 5, 9])
BACKENDS = ("torch", "cpu")


def _inputs(H, Hkv, seed, tie=False):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    if tie:  # two visual keys equal in every head: their scores tie exactly, on any number of ranks
        for b in range(B):
            s = int(VIS_START[b])
            k[b, :, s + 7] = k[b, :, s + 3]
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :3] = False  # padding keys
    mask[2, 4] = False
    return q, k, mask


def _same_on_every_rank(*tensors):
    for t in tensors:
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t.contiguous())
        for other in gathered:
            assert torch.equal(other, t), "a rank selected or scored differently"


def _agrees_with_one_rank(tp, full, keep):
    """Same kept tokens as one rank with all heads, unless two single-rank scores lie within fp32
    rounding of each other at the k-th place; scores within fp32 rounding."""
    (keep_tp, rest_tp, s_tp), (keep_1, rest_1, s_1) = tp, full
    torch.testing.assert_close(s_tp, s_1, rtol=4e-6, atol=1e-7)
    for b in range(B):
        row = s_1[b]
        kb = keep if isinstance(keep, int) else int(keep[b])
        n = int((keep_1[b] >= 0).sum() + (rest_1[b] >= 0).sum())
        vals = row[:n].sort(descending=True).values
        if 0 < kb < n and vals[kb - 1] - vals[kb] <= 1e-5 * vals[kb - 1].abs():
            continue  # a near-tie at the boundary: either choice is right
        assert torch.equal(keep_tp[b], keep_1[b]) and torch.equal(rest_tp[b], rest_1[b])


def _check_scoring(rank, world):
    for H, Hkv in ((8, 4), (8, 2), (8, 1)):
        if not (Hkv % world == 0 or world % Hkv == 0):
            continue
        for seed, tie in ((0, False), (1, True)):
            q, k, mask = _inputs(H, Hkv, seed, tie)
            q_r, k_r = shard_heads(q, k, rank, world)
            for backend in BACKENDS:
                full = ops.score_select(q, k, VIS_START, N_V, 5, 0.35, mask, backend=backend)
                tp = tp_score_select(q_r, k_r, VIS_START, N_V, 5, 0.35, mask, backend=backend)
                _same_on_every_rank(*tp)
                _agrees_with_one_rank(tp, full, 5)
                if tie:  # the tied pair: the lower index wins on every rank, as on one rank
                    assert torch.equal(tp[2][:, 3], tp[2][:, 7])
                # ragged: per-sample visual counts and keeps, padded widths
                counts, keep = torch.tensor([12, 7, 10]), torch.tensor([5, 2, 4])
                full = ops.score_select(q, k, VIS_START, counts, keep, 0.35, mask, max_vis_len=N_V, max_keep=5,
                                        backend=backend)
                tp = tp_score_select(q_r, k_r, VIS_START, counts, keep, 0.35, mask, max_vis_len=N_V, max_keep=5,
                                     backend=backend)
                assert [t.shape for t in tp] == [t.shape for t in full]
                _same_on_every_rank(*tp)
                _agrees_with_one_rank(tp, full, keep)
                # the scores alone, and an explicit head count
                s = tp_tv_score(q_r, k_r, VIS_START, N_V, 0.35, mask, num_heads=H, backend=backend)
                torch.testing.assert_close(s, ops.tv_score(q, k, VIS_START, N_V, 0.35, mask, backend=backend),
                                           rtol=4e-6, atol=1e-7)
                with pytest.raises(ValueError, match="^num_heads"):
                    tp_tv_score(q_r, k_r, VIS_START, N_V, 0.35, mask, num_heads=H + 1, backend=backend)


def _run_stages(engine, h, q, k, mask, ragged):
    """A SwiftVLM-shaped run: stage 0 (merging) after a layer, then restore and stage 1 before the
    next (drop): the sequences every step makes."""
    seq = Sequence.begin(h, VIS_START, N_V, mask, vis_counts=torch.tensor([12, 7, 10]) if ragged else None)
    first = engine.select(seq, 0, q, k)
    n = first.h.shape[1]
    first.h = first.h * 1.5 + 0.25  # "layers" in between: the merged tokens drift
    back = engine.restore(first)
    second = engine.select(back, 1, q, k)
    return [first.h, back.h, second.h, *first.kept, *second.kept, second.key_mask], n


def _check_engine(rank, world):
    H, Hkv = 8, 4 if world in (2, 4) else 1
    q, k, mask = _inputs(H, Hkv, 3)
    h = torch.randn(B, L, 6, generator=torch.Generator().manual_seed(4))
    q_r, k_r = shard_heads(q, k, rank, world)
    group = dist.new_group(list(range(world)))
    for ragged in (False, True):
        plan = (RaggedPlan.for_counts(SwiftVLM(layers=(2, 4), keep=(5, 3), merge=(2,)), [12, 7, 10], 6) if ragged
                else PruningPlan("swiftvlm", N_V, 6, (Stage(2, 5, 2), Stage(4, 3, 0)), True))
        for backend in BACKENDS:
            one, _ = _run_stages(PruningEngine(plan, 0.35, backend), h.clone(), q, k, mask, ragged)
            tp, _ = _run_stages(PruningEngine(plan, 0.35, backend, process_group=group), h.clone(), q_r, k_r, mask,
                                ragged)
            _same_on_every_rank(*tp)
            for a, b in zip(tp, one):  # random inputs: no near-ties at these sizes (seeded)
                assert torch.equal(a, b)


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        _check_scoring(rank, world)
        _check_engine(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tensor_parallel_scoring_on_gloo(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init")), nprocs=world, join=True)


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def _check_failing_together(rank, world):
    """Each rank's bad input, or ranks that disagree, make EVERY rank raise (no rank returns while its
    peer raises, none is left waiting); a rank that raises without the check leaves its peer to the
    process group's timeout, which the user sets."""
    q, k, mask = _inputs(8, 2, 5)
    q_r, k_r = shard_heads(q, k, rank, world)
    # an invalid keep on rank 0 only: rank 0 raises its own error, the peer a ValueError naming the group
    keep = 20 if rank == 0 else 5
    _raises("^keep" if rank == 0 else "^process_group: another rank", tp_score_select, q_r, k_r, VIS_START, N_V,
            keep, 0.35, mask)
    # ranks with different vis_start: both raise
    start = VIS_START + (1 if rank == 1 else 0)
    _raises("disagree", tp_score_select, q_r, k_r, start, N_V, 5, 0.35, mask)
    # different counts of a ragged batch: both raise
    counts = torch.tensor([12, 7, 10 - rank])
    _raises("disagree", tp_score_select, q_r, k_r, VIS_START, counts, torch.tensor([5, 2, 4]), 0.35, mask,
            max_vis_len=N_V, max_keep=5)
    # a different shape of the same size: [2, 6] scores on rank 0, [3, 4] on rank 1 (12 values each)
    b, n = (2, 6) if rank == 0 else (3, 4)
    _raises("disagree", tp_tv_score, q_r[:b], k_r[:b], VIS_START[:b], n, 0.35)
    # and the agreeing call still works after all that
    tp_score_select(q_r, k_r, VIS_START, N_V, 5, 0.35, mask)


def _failing_worker(rank, world, init_file):
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3))
    torch.set_num_threads(1)
    try:
        _check_failing_together(rank, world)
        q, k, mask = _inputs(8, 2, 5)
        q_r, k_r = shard_heads(q, k, rank, world)
        if rank == 0:  # without the check: rank 0 raises before the collective ...
            _raises("^keep", tp_score_select, q_r, k_r, VIS_START, N_V, 20, 0.35, mask, check=False)
        else:  # ... and its peer waits in the all_reduce only until the group's timeout
            import time

            start = time.monotonic()
            with pytest.raises(RuntimeError):
                tp_score_select(q_r, k_r, VIS_START, N_V, 5, 0.35, mask, check=False)
            assert time.monotonic() - start < 30
    finally:
        dist.destroy_process_group()


def test_ranks_fail_together_on_gloo():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_failing_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)


def test_shard_heads_follows_the_global_gqa_rule():
    """Rank r's query head i is global head r H/W + i; the KV head it reads locally
    (i // (H_r / Hkv_r)) is the global KV head that global head reads."""
    H = 8
    for Hkv in (8, 4, 2, 1):
        q = torch.arange(H, dtype=torch.float32).view(1, H, 1)
        k = torch.arange(Hkv, dtype=torch.float32).view(1, Hkv, 1, 1)
        for world in (1, 2, 4, 8):
            if not (Hkv % world == 0 or world % Hkv == 0):
                continue
            for rank in range(world):
                q_r, k_r = shard_heads(q, k, rank, world)
                local_group = q_r.shape[1] // k_r.shape[1]
                for i in range(q_r.shape[1]):
                    head = int(q_r[0, i, 0])
                    assert head == rank * (H // world) + i
                    assert int(k_r[0, i // local_group, 0, 0]) == head // (H // Hkv)


def test_errors():
    q, k = torch.randn(1, 8, 4), torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="^world"):
        shard_heads(q, k, 0, 3)
    with pytest.raises(ValueError, match="^rank"):
        shard_heads(q, k, 2, 2)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="^process_group"):
            tp_score_select(q, k, torch.tensor([0]), 4, 2, 0.5)
