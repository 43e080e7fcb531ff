"""The pruning engine on its own (no model): what select and restore do to a sequence, the carried
per-token tensors, the key mask, and what a stage costs in ops and host syncs."""
import pytest
import torch

import python_ref
from bench.host import OpCounter, stage_ops
from swiftvlm_kernels.models.tiny import tiny_inputs, tiny_llava
from swiftvlm_kernels.pruning import ALVTS, FastV, PDrop, PruningEngine, PruningPlan, Sequence, Stage, SwiftVLM

B, L, D_MODEL, N_V = 3, 20, 6, 8
H, HKV, D = 4, 2, 5


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, D_MODEL, generator=g)
    vis_start = torch.tensor([2, 5, 9])
    q, k = torch.randn(B, H, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    return h, vis_start, q, k


def plan(*stages, bypass=True):
    return PruningPlan("swiftvlm" if bypass else "pdrop", N_V, 6, tuple(Stage(*s) for s in stages), bypass)


def test_select_keeps_the_scored_tokens_and_moves_the_carried_tensors():
    h, vis_start, q, k = batch()
    engine = PruningEngine(plan((1, 3, 2), (3, 3, 0)), scale=0.4)
    positions = torch.arange(L).expand(B, L)[..., None] * 10
    seq = engine.select(Sequence.begin(h, vis_start, N_V, carry={"pos": positions}), 0, q, k)
    keep, rest, _ = python_ref.score_select(q, k, vis_start, N_V, 3, 0.4)
    assert torch.equal(seq.kept[0], keep)
    assert seq.h.shape == (B, L - N_V + 3 + 2, D_MODEL) and seq.vis_len == 5
    # every row's input position, in order; the carried tensor moved with the rows
    assert (seq.index.diff(dim=1) > 0).all()
    assert torch.equal(seq.carry["pos"][..., 0], seq.index * 10)
    for b in range(B):
        s = int(vis_start[b])
        kept_rows = (s + keep[b]).tolist()
        targets = (s + rest[b, [0, 2]]).tolist()  # floor(z R / Z) for R = 5, Z = 2
        assert seq.index[b].tolist() == list(range(s)) + sorted(kept_rows + targets) + list(range(s + N_V, L))
        for row, pos in enumerate(seq.index[b].tolist()):
            if pos in kept_rows or pos < s or pos >= s + N_V:
                assert torch.equal(seq.h[b, row], h[b, pos])
    merged, _, _ = python_ref.group_merge(h.gather(1, (vis_start[:, None] + rest)[..., None].expand(-1, -1, D_MODEL)), 2)
    for b in range(B):  # the merged tokens sit at their targets' rows
        rows = torch.isin(seq.index[b], vis_start[b] + rest[b, [0, 2]])
        assert torch.equal(seq.h[b, rows], merged[b])


def test_restore_after_no_layers_gives_the_sequence_back():
    """Nothing ran in between: the merged tokens did not drift, so every token is back exactly."""
    h, vis_start, q, k = batch(1)
    engine = PruningEngine(plan((1, 2, 3), (4, 5, 0)), scale=0.4)
    start = Sequence.begin(h, vis_start, N_V, carry={"x": h * 2})
    back = engine.restore(engine.select(start, 0, q, k))
    assert torch.equal(back.h, h) and torch.equal(back.carry["x"], h * 2) and back.vis_len == N_V
    assert torch.equal(back.index, torch.arange(L).expand(B, L))
    assert len(back.kept) == 1


def test_restore_shifts_the_rest_by_their_merged_tokens_drift():
    h, vis_start, q, k = batch(2)
    engine = PruningEngine(plan((1, 2, 3), (4, 5, 0)), scale=0.4)
    seq = engine.select(Sequence.begin(h, vis_start, N_V), 0, q, k)
    seq.h = seq.h + 1.0  # a "layer" that adds 1 to every row
    back = engine.restore(seq)
    _, rest, _ = python_ref.score_select(q, k, vis_start, N_V, 2, 0.4)
    rest_rows = vis_start[:, None] + rest
    for b in range(B):
        for r in range(L):
            # kept and text rows ran the layer; a rest token gets its merged token's drift: also + 1
            assert torch.allclose(back.h[b, r], h[b, r] + 1.0, atol=1e-6), (b, r, r in rest_rows[b])


def test_drop_only_stages_follow_the_survivors():
    h, vis_start, q, k = batch(3)
    engine = PruningEngine(plan((1, 6, 0), (2, 3, 0), bypass=False), scale=0.4)
    first = engine.select(Sequence.begin(h, vis_start, N_V), 0, q, k)
    k2 = torch.randn(B, HKV, first.h.shape[1], D)
    second = engine.select(first, 1, q, k2)
    slots, _, _ = python_ref.score_select(q, k2, vis_start, 6, 3, 0.4)
    assert torch.equal(second.kept[1], first.kept[0].gather(1, slots))  # ids, not slots
    assert torch.equal(second.block_ids, second.kept[1])
    assert torch.isin(second.kept[1], first.kept[0]).all()


def test_left_padded_key_mask_is_a_view_and_equals_the_gathered_one():
    h, vis_start, q, k = batch(4)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :3] = False
    key_mask[2, :7] = False
    engine = PruningEngine(plan((1, 3, 2), (3, 3, 0)), scale=0.4)
    sliced = engine.select(Sequence.begin(h, vis_start, N_V, key_mask, left_padded=True), 0, q, k)
    gathered = engine.select(Sequence.begin(h, vis_start, N_V, key_mask), 0, q, k)
    assert sliced.key_mask._base is key_mask or sliced.key_mask.data_ptr() == key_mask.data_ptr()
    assert torch.equal(sliced.key_mask, gathered.key_mask)
    assert torch.equal(sliced.key_mask, key_mask.gather(1, sliced.index))


def test_a_stage_without_bypass_restores_nothing():
    h, vis_start, q, k = batch(5)
    engine = PruningEngine(plan((1, N_V, 0), (2, N_V, 0)), scale=0.4)
    seq = engine.select(Sequence.begin(h, vis_start, N_V), 0, q, k)
    assert engine.restore(seq) is seq and torch.equal(seq.h, h)


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.mark.parametrize("inputs", [tiny_inputs(1), tiny_inputs(2, left_pad=2)], ids=["unpadded", "left-padded"])
def test_stage_op_counts_and_no_host_sync(model, inputs):
    """Counted, not timed: the ops each stage dispatches beyond the vanilla forward (each one a kernel
    launch on a GPU) and reads of device values on the host (none: the path can be graph-captured).
    A regression guard at today's counts (SwiftVLM 12.7: its merging stage before a layer lets the
    layer compute its own normed input and keys, since merged rows changed after scoring; FastV 3,
    PDrop 3.7; ALVTS 8 per selecting layer: the selector's one matmul, attention_importance, t2v * v2v,
    topk_select, compact, the RoPE table's and the normed input's takes, restore). The project's goal
    of 12 is checked, and reported missed, by bench.report."""
    rows = stage_ops(model, inputs, [("swiftvlm", SwiftVLM()), ("fastv", FastV()), ("pdrop", PDrop(layers=(4, 8, 12))),
                                     ("alvts", ALVTS())])
    bound = {"swiftvlm": 38 / 3, "fastv": 3, "pdrop": 11 / 3, "alvts": 8}
    for r in rows:
        assert r["ops_per_stage"] <= bound[r["method"]] + 1e-9, r
        assert r["syncs_beyond_vanilla"] == 0, r
        if r["method"] == "alvts":
            assert r["stages"] == 15 and set(r["swiftvlm_ops"]) == {
                "swiftvlm::attention_importance", "swiftvlm::topk_select", "swiftvlm::compact", "swiftvlm::restore"}
        else:
            assert set(r["swiftvlm_ops"]) >= {"swiftvlm::score_select", "swiftvlm::compact"}


def test_ragged_stage_op_counts_and_no_host_sync(model):
    """The same count on a ragged batch (4 samples of 1 to 3 images, bench.host.tiny_ragged_inputs): a
    regression guard at today's counts (SwiftVLM 72 over 3 stages, FastV 15, PDrop 51, ALVTS 272 over
    15). A ragged stage rebuilds the block's key mask: from the rows' place relative to the block (made
    once per forward, in vis_start's dtype) and the block's per-sample rows from the plan."""
    from bench.host import tiny_ragged_inputs

    rows = stage_ops(model, tiny_ragged_inputs()[0], [("swiftvlm", SwiftVLM()), ("fastv", FastV()),
                                                      ("pdrop", PDrop(layers=(4, 8, 12))), ("alvts", ALVTS())])
    bound = {"swiftvlm": 72 / 3, "fastv": 15, "pdrop": 51 / 3, "alvts": 272 / 15}
    for r in rows:
        assert r["ops_per_stage"] <= bound[r["method"]] + 1e-9, r
        assert r["syncs_beyond_vanilla"] == 0, r


@pytest.mark.parametrize("pruning", [SwiftVLM(), ALVTS()], ids=["swiftvlm", "alvts"])
def test_the_prefill_issues_no_host_sync(model, pruning):
    """Beyond the input checks (which read input_ids on the host once), nothing syncs."""
    inputs = tiny_inputs(2, left_pad=2)
    checked = model.check_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], True)
    plan = model.plan_for(pruning)
    selector = model.selector_for(pruning, plan)  # (ALVTS: made once per model, before the prefill)
    with OpCounter() as counter:
        model.prefill(*checked[:3], plan, selector=selector)
    assert counter.syncs == 0, counter.by_name
