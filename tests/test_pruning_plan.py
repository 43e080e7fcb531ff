import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swiftvlm_kernels.pruning import ALVTS, FastV, PDrop, PruningPlan, RaggedPlan, Stage, SwiftVLM

N_VIS, LAYERS = 576, 32  # LLaVA-1.5-7B


def counts(pruning, n_vis=N_VIS, num_layers=LAYERS):
    return pruning.plan(n_vis, num_layers).visual_tokens_per_layer()


# --- hand-worked plans (the module docstring's worked example) ---------------------------------

def test_swiftvlm_budget_192_and_128_llava():
    plan = SwiftVLM(budget=192).plan(N_VIS, LAYERS)
    assert plan.method == "swiftvlm" and plan.bypass and plan.layers == (3, 11, 15)
    assert plan.stages == (Stage(3, 144, 22), Stage(11, 144, 22), Stage(15, 144, 0))
    assert plan.visual_tokens_per_layer() == [576] * 3 + [166] * 11 + [144] * 18
    assert plan.average_visual_tokens() == 6146 / 32
    assert counts(SwiftVLM(budget=128)) == [576] * 3 + [72 + 25] * 11 + [72] * 18


def test_fastv_budget_192_and_128_llava():
    plan = FastV(budget=192).plan(N_VIS, LAYERS)
    assert plan.method == "fastv" and not plan.bypass and plan.stages == (Stage(2, 166, 0),)
    assert plan.visual_tokens_per_layer() == [576] * 2 + [166] * 30
    assert counts(FastV(budget=128)) == [576] * 2 + [98] * 30


def test_pdrop_budget_192_llava_tie_goes_to_smaller_k():
    plan = PDrop(budget=192).plan(N_VIS, LAYERS)
    # k = 109 -> 191.75 and k = 110 -> (110, 55, 28) -> 192.25 tie; the smaller k wins.
    assert [s.keep for s in plan.stages] == [109, 55, 27]
    assert plan.visual_tokens_per_layer() == [576] * 8 + [109] * 8 + [55] * 8 + [27] * 8
    assert PDrop(keep=(110, 55, 28)).plan(N_VIS, LAYERS).average_visual_tokens() == 192.25


def test_explicit_keep_and_merge_swiftvlm():
    plan = SwiftVLM(keep=(200, 150, 100), merge=(10, 5)).plan(N_VIS, LAYERS)
    assert plan.stages == (Stage(3, 200, 10), Stage(11, 150, 5), Stage(15, 100, 0))
    # stage 1 acts after layer 3; stages 2-3 act from their own layer on
    assert plan.visual_tokens_per_layer() == [576] * 3 + [210] * 7 + [155] * 4 + [100] * 18


def test_explicit_keep_default_merge_follows_ratio():
    plan = SwiftVLM(keep=(100, 300, 50), merge_ratio=0.1).plan(N_VIS, LAYERS)
    assert [s.merge for s in plan.stages] == [48, 28, 0]  # round(0.1 * 476), round(0.1 * 276)
    # the merge count is at least 1 while there is a rest, and 0 without one
    plan = SwiftVLM(keep=(575, 576, 3)).plan(N_VIS, LAYERS)
    assert [s.merge for s in plan.stages] == [1, 0, 0]


def test_explicit_keep_pdrop_and_fastv():
    assert counts(PDrop(keep=(288, 144, 72))) == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert counts(FastV(layer=5, keep=100), num_layers=8) == [576] * 5 + [100] * 3


def test_consecutive_swiftvlm_layers_and_last_layer():
    # stage 2 at layer 4 acts before layer 4: stage 1's merged tokens run through no layer
    assert counts(SwiftVLM(layers=(3, 4), keep=(10, 20), merge=(5,)), num_layers=6) == \
        [576] * 3 + [20] * 3
    # a SwiftVLM stage s >= 2 may sit at the last layer: that layer runs on the kept set
    assert counts(SwiftVLM(layers=(2, 6), keep=(10, 20), merge=(5,)), num_layers=6) == \
        [576] * 2 + [15] * 3 + [20]
    assert counts(SwiftVLM(layers=(5, 6), keep=(10, 20), merge=(5,)), num_layers=6) == \
        [576] * 5 + [20]


def test_single_stage_swiftvlm_drops():
    plan = SwiftVLM(layers=(2,), keep=(100,)).plan(N_VIS, LAYERS)
    assert plan.stages == (Stage(2, 100, 0),)
    assert plan.visual_tokens_per_layer() == counts(FastV(layer=2, keep=100))


@pytest.mark.parametrize("pruning", [SwiftVLM(keep=(576,) * 3), PDrop(keep=(576,) * 3),
                                     FastV(keep=576), SwiftVLM(budget=576),
                                     PDrop(budget=576, ratio=1.0), FastV(budget=576)])
def test_keep_all(pruning):
    plan = pruning.plan(N_VIS, LAYERS)
    assert all(s.keep == N_VIS and s.merge == 0 for s in plan.stages)
    assert plan.visual_tokens_per_layer() == [N_VIS] * LAYERS


def test_default_budget_is_a_third():
    for cls in (SwiftVLM, FastV, PDrop):
        assert cls().plan(N_VIS, LAYERS) == cls(budget=192).plan(N_VIS, LAYERS)
    assert SwiftVLM(layers=(2, 5)).plan(90, 8) == SwiftVLM(layers=(2, 5), budget=30).plan(90, 8)


def test_alvts_selects_at_every_layer_from_2_for_that_layer_only():
    """ALVTS: one stage per selecting layer (default 2..L), each acting before its layer and for it
    only; the budget counts k at each selecting layer and n_vis at layer 1."""
    plan = ALVTS(budget=192).plan(N_VIS, LAYERS)
    assert plan.method == "alvts" and not plan.bypass and plan.layers == tuple(range(2, 33))
    assert {s.keep for s in plan.stages} == {180} and {s.merge for s in plan.stages} == {0}
    assert plan.visual_tokens_per_layer() == [576] + [180] * 31
    assert plan.average_visual_tokens() == (576 + 31 * 180) / 32 == 192.375  # 179: 191.41
    assert ALVTS(budget=128).plan(N_VIS, LAYERS).stages[0].keep == 114  # (576 + 31 * 114) / 32 = 128.44
    for s in range(len(plan.stages)):
        assert plan.acts_before(s) and plan.layer_only(s) and plan.scored_tokens(s) == N_VIS
        assert plan.effective_layer(s) == s + 2
    assert plan.stage_before(2) == 0 and plan.stage_before(32) == 30 and plan.stage_after(2) is None
    assert plan.stage_before(1) is None
    assert not SwiftVLM().plan(N_VIS, LAYERS).layer_only(1) and not FastV().plan(N_VIS, LAYERS).layer_only(0)
    # explicit layers and keep counts: free in [0, n_vis] at every layer, in any order
    explicit = ALVTS(layers=(1, 5, 32), keep=(10, 400, 3)).plan(N_VIS, LAYERS)
    counts = [576] * 32
    counts[0], counts[4], counts[31] = 10, 400, 3
    assert explicit.visual_tokens_per_layer() == counts
    assert ALVTS(keep=7).plan(36, 4).visual_tokens_per_layer() == [36, 7, 7, 7]
    assert ALVTS().plan(36, 16).average_visual_tokens() == pytest.approx(12, abs=0.5)  # T = n_vis / 3
    assert ALVTS(budget_ratio=1 / 9).plan(36, 16).stages[0].keep == 2  # (36 + 15 * 2) / 16 = 4.125
    with pytest.raises(ValueError, match=r"^budget_ratio: expected a number in \[0\.0312, 1\.0000\]"):
        ALVTS(budget_ratio=0.03).plan(N_VIS, LAYERS)  # k = 0 still runs layer 1 on all: 576 / 32
    ragged = RaggedPlan.for_counts(ALVTS(budget_ratio=0.25), [36, 72], 16)
    assert ragged.layer_only(0) and ragged.acts_before(14) and ragged.stages[0].keep == max(
        p.stages[0].keep for p in ragged.plans)


def test_frozen():
    plan = SwiftVLM().plan(N_VIS, LAYERS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.n_vis = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.stages[0].keep = 3


# --- the budget rule ---------------------------------------------------------------------------

def check_budget(make, n_vis, num_layers, budget):
    """The plan is within half a token of the budget (the rule's guarantee)."""
    plan = make(budget).plan(n_vis, num_layers)
    assert abs(plan.average_visual_tokens() - budget) <= 0.5
    return plan, [s.keep for s in plan.stages]


def rule_average(make, k, n_vis, num_layers):
    """Average visual tokens per layer of the budget rule's plan for the free count k."""
    pruning = make(None)
    if isinstance(pruning, FastV):
        keep = k
    elif isinstance(pruning, ALVTS):
        keep = (k,) * len(pruning.selecting_layers(num_layers))
        pruning = dataclasses.replace(pruning, layers=pruning.selecting_layers(num_layers))
    elif isinstance(pruning, PDrop):
        keep = tuple(math.floor(k * pruning.ratio ** s + 0.5) for s in range(len(pruning.layers)))
    else:
        keep = (k,) * len(pruning.layers)
    plan = dataclasses.replace(pruning, keep=keep).plan(n_vis, num_layers)
    return plan.average_visual_tokens()


def feasible_budgets(make, n_vis, num_layers):
    """[smallest, largest] feasible budget: the rule's averages at k = 0 and k = n_vis."""
    return rule_average(make, 0, n_vis, num_layers), rule_average(make, n_vis, n_vis, num_layers)


GRID = [
    (lambda b: SwiftVLM(budget=b), 576, 32),
    (lambda b: SwiftVLM(layers=(2, 9, 20, 31), budget=b, merge_ratio=0.2), 576, 32),
    (lambda b: SwiftVLM(layers=(1, 2), budget=b), 37, 4),
    (lambda b: SwiftVLM(layers=(3,), budget=b), 64, 8),
    (lambda b: FastV(budget=b), 576, 32),
    (lambda b: FastV(layer=7, budget=b), 13, 8),
    (lambda b: PDrop(budget=b), 576, 32),
    (lambda b: PDrop(layers=(2, 6, 8), budget=b, ratio=0.7), 576, 32),
    (lambda b: PDrop(layers=(1, 2, 3), budget=b, ratio=1.0), 21, 5),
    (lambda b: ALVTS(budget=b), 576, 32),
    (lambda b: ALVTS(layers=(1, 4, 5), budget=b), 13, 8),
]


@pytest.mark.parametrize("make, n_vis, num_layers", GRID)
def test_budget_rule_hits_the_budget(make, n_vis, num_layers):
    lowest, highest = feasible_budgets(make, n_vis, num_layers)
    budgets = [lowest + (highest - lowest) * i / 23 for i in range(24)]
    for budget in budgets + [lowest + 0.5, highest - 0.3]:
        plan, keeps = check_budget(make, n_vis, num_layers, budget)
        k, error = keeps[0], abs(plan.average_visual_tokens() - budget)
        if k > 0:  # no other k is closer; ties go to the smaller k
            assert abs(rule_average(make, k - 1, n_vis, num_layers) - budget) > error
        if k < n_vis:
            assert abs(rule_average(make, k + 1, n_vis, num_layers) - budget) >= error
        if plan.method in ("swiftvlm", "alvts"):  # equal k (SwiftVLM: Z from merge_ratio)
            assert len(set(keeps)) == 1
        if plan.method == "pdrop":
            ratio = make(0).ratio
            assert keeps == [math.floor(keeps[0] * ratio ** s + 0.5) for s in range(len(keeps))]
    for budget in (lowest - 0.01, highest + 0.01):
        with pytest.raises(ValueError, match="budget"):
            make(budget).plan(n_vis, num_layers)


@given(st.integers(1, 200), st.integers(2, 40), st.data())
@settings(max_examples=60, deadline=None)
def test_budget_rule_random(n_vis, num_layers, data):
    method = data.draw(st.sampled_from(["swiftvlm", "fastv", "pdrop"]))
    layers = data.draw(st.lists(st.integers(1, num_layers - 1), min_size=1, max_size=4,
                                unique=True))
    layers = tuple(sorted(layers))
    if method == "swiftvlm":
        ratio = data.draw(st.floats(0.01, 1.0))
        make = lambda b: SwiftVLM(layers=layers, budget=b, merge_ratio=ratio)  # noqa: E731
    elif method == "fastv":
        make = lambda b: FastV(layer=layers[0], budget=b)  # noqa: E731
    else:
        ratio = data.draw(st.floats(0.01, 1.0))
        make = lambda b: PDrop(layers=layers, budget=b, ratio=ratio)  # noqa: E731
    budget = data.draw(st.floats(*feasible_budgets(make, n_vis, num_layers)))
    check_budget(make, n_vis, num_layers, budget)


def test_infeasible_budget_names_the_range():
    with pytest.raises(ValueError, match=r"budget: expected a number in \[144.00, 396.00\]"):
        PDrop(budget=128).plan(N_VIS, LAYERS)
    with pytest.raises(ValueError, match=r"\[144.00, 396.00\]"):
        PDrop(budget=397).plan(N_VIS, LAYERS)
    with pytest.raises(ValueError, match=r"budget: expected a number in \[63.97, 576.00\]"):
        SwiftVLM(budget=63).plan(N_VIS, LAYERS)
    with pytest.raises(ValueError, match=r"\[36.00, 576.00\]"):
        FastV(budget=600).plan(N_VIS, LAYERS)
    assert SwiftVLM(budget=(3 * 576 + 11 * 29) / 32).plan(N_VIS, LAYERS).stages[0].keep == 0


# --- bad input ---------------------------------------------------------------------------------

BAD_CONSTRUCTION = [
    (lambda: SwiftVLM(layers=(3, 3)), "layers"),
    (lambda: SwiftVLM(layers=(11, 3)), "layers"),
    (lambda: SwiftVLM(layers=(0, 3)), "layers"),
    (lambda: SwiftVLM(layers=()), "layers"),
    (lambda: SwiftVLM(layers="3"), "layers"),
    (lambda: SwiftVLM(layers=(3.0, 11)), "layers"),
    (lambda: SwiftVLM(layers=(True, 11)), "layers"),
    (lambda: SwiftVLM(budget=192, keep=(1, 2, 3)), "budget, keep"),
    (lambda: SwiftVLM(budget=-1), "budget"),
    (lambda: SwiftVLM(budget=math.nan), "budget"),
    (lambda: SwiftVLM(budget="192"), "budget"),
    (lambda: SwiftVLM(keep=(1, 2)), "keep"),
    (lambda: SwiftVLM(keep=(1, -2, 3)), "keep"),
    (lambda: SwiftVLM(keep=5), "keep"),
    (lambda: SwiftVLM(merge=(1, 2)), "merge"),
    (lambda: SwiftVLM(keep=(1, 2, 3), merge=(1, 2, 3)), "merge"),
    (lambda: SwiftVLM(merge_ratio=0), "merge_ratio"),
    (lambda: SwiftVLM(merge_ratio=1.5), "merge_ratio"),
    (lambda: FastV(layer=0), "layer"),
    (lambda: FastV(layer=2.5), "layer"),
    (lambda: FastV(keep=-1), "keep"),
    (lambda: FastV(keep=(5,)), "keep"),
    (lambda: PDrop(ratio=0.0), "ratio"),
    (lambda: PDrop(keep=(3, 2)), "keep"),
    (lambda: ALVTS(layers=(3, 3)), "layers"),
    (lambda: ALVTS(keep=(1, 2)), "keep"),
    (lambda: ALVTS(layers=(2, 3), keep=(1, 2, 3)), "keep"),
    (lambda: ALVTS(keep=-1), "keep"),
    (lambda: ALVTS(budget=3, keep=4), "budget, keep"),
    (lambda: ALVTS(budget_ratio=1.5), "budget_ratio"),
    (lambda: ALVTS(rank=0), "rank"),
    (lambda: ALVTS(rank=2.0), "rank"),
    (lambda: ALVTS(selector=3), "selector"),
    (lambda: Stage(0, 1, 0), "Stage.layer"),
    (lambda: Stage(1, -1, 0), "Stage.keep"),
    (lambda: Stage(1, 1, -1), "Stage.merge"),
]

BAD_PLAN = [
    (SwiftVLM(keep=(600, 100, 100)), 576, 32, "keep"),
    (SwiftVLM(keep=(100, 100, 600)), 576, 32, "keep"),
    (SwiftVLM(keep=(100, 100, 100), merge=(477, 5)), 576, 32, "merge"),
    (SwiftVLM(keep=(100, 100, 100), merge=(0, 5)), 576, 32, "merge"),
    (SwiftVLM(layers=(3, 11, 40)), 576, 32, "layers"),
    (SwiftVLM(layers=(32,)), 576, 32, "layers"),
    (SwiftVLM(layers=(3, 11), keep=(1, 1)), 576, 10, "layers"),
    (FastV(layer=32), 576, 32, "layers"),
    (FastV(keep=577), 576, 32, "keep"),
    (PDrop(layers=(8, 16, 32)), 576, 32, "layers"),
    (PDrop(keep=(100, 200, 50)), 576, 32, "keep"),
    (SwiftVLM(), 0, 32, "n_vis"),
    (SwiftVLM(), 576, 0, "num_layers"),
    (FastV(), 576.0, 32, "n_vis"),
    (ALVTS(layers=(2, 33)), 576, 32, "layers"),
    (ALVTS(keep=577), 576, 32, "keep"),
    (ALVTS(layers=(2, 3), keep=(5, 577)), 576, 32, "keep"),
    (ALVTS(), 576, 1, "layers"),
]


@pytest.mark.parametrize("make, name", BAD_CONSTRUCTION)
def test_bad_construction_raises(make, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        make()


@pytest.mark.parametrize("pruning, n_vis, num_layers, name", BAD_PLAN)
def test_bad_plan_raises(pruning, n_vis, num_layers, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        pruning.plan(n_vis, num_layers)


@pytest.mark.parametrize("kwargs, name", [
    (dict(method="random"), "method"),
    (dict(bypass=False), "bypass"),
    (dict(stages=()), "stages"),
    (dict(stages=((3, 10, 0),)), "stages"),
    (dict(stages=(Stage(3, 10, 5), Stage(11, 10, 3))), "merge"),
    (dict(method="pdrop", bypass=False, stages=(Stage(3, 10, 5),)), "merge"),
    (dict(stages=(Stage(11, 10, 5), Stage(3, 10, 0))), "layers"),
    (dict(method="alvts", bypass=False, stages=(Stage(3, 10, 1),)), "merge"),
    (dict(method="alvts", bypass=True), "bypass"),
    (dict(method="alvts", bypass=False, stages=(Stage(3, 577, 0),)), "keep"),
])
def test_bad_direct_plan_raises(kwargs, name):
    fields = dict(method="swiftvlm", n_vis=576, num_layers=32, stages=(Stage(3, 10, 0),),
                  bypass=True)
    PruningPlan(**fields)
    with pytest.raises(ValueError, match=f"^{name}"):
        PruningPlan(**{**fields, **kwargs})


def test_an_unreachable_budget_ratio_is_named_as_given():
    """SwiftVLM(budget_ratio=0) names budget_ratio (what the user typed), with the reachable ratios."""
    for method in (SwiftVLM(budget_ratio=0), FastV(budget_ratio=0.01), PDrop(budget_ratio=0.9)):
        with pytest.raises(ValueError, match=r"^budget_ratio: expected a number in \[0\.\d{4}, [01]\.\d{4}\]"):
            method.plan(576, 32)
    with pytest.raises(ValueError, match=r"^budget: expected a number in \["):
        SwiftVLM(budget=10).plan(576, 32)
