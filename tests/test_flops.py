from types import SimpleNamespace

import pytest
import torch

from swiftvlm_kernels.pruning.flops import PrefillFlops, layer_flops, prefill_flops, selector_flops
from swiftvlm_kernels.pruning import ALVTS, FastV, PDrop, Selector, SwiftVLM

TINY = dict(hidden_size=8, intermediate_size=20, num_hidden_layers=6)
LLAVA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)


def test_layer_flops_hand_computed():
    # Eq. 17, n = 5, d = 8, m = 20: 4*5*64 + 2*25*8 + 3*5*8*20 = 4080 multiply-adds
    assert layer_flops(5, 8, 20) == 2 * 4080


def test_vanilla_hand_computed():
    f = prefill_flops(TINY, n_text=2, n_vis=3)
    assert f == PrefillFlops(total=6 * 8160, per_layer=(8160,) * 6, overhead=0)
    assert isinstance(f.total, int) and f.paper_units == 6 * 4080
    assert prefill_flops(SimpleNamespace(**TINY), 2, 3) == f  # an HF-config-like object works


@pytest.mark.parametrize("pruning", [SwiftVLM(layers=(2, 4), keep=(10, 10)), FastV(keep=10),
                                     PDrop(layers=(1, 3, 5), keep=(10, 10, 10)), ALVTS(keep=10)])
def test_keep_all_layers_equal_vanilla(pruning):
    vanilla = prefill_flops(TINY, 2, 10)
    f = prefill_flops(TINY, 2, 10, pruning)
    assert f.per_layer == vanilla.per_layer
    assert f.total == vanilla.total + f.overhead and f.overhead > 0  # the scores are still computed


def test_swiftvlm_overhead_hand_worked():
    # d = 8, n_text = 2, n_vis = 10, 6 layers; stage 1 at layer 2: keep 4, merge the R = 6 rest into
    # Z = 2; stage 2 at layer 4: keep 3, drop the rest (R = 7).
    pruning = SwiftVLM(layers=(2, 4), keep=(4, 3), merge=(2,))
    f = prefill_flops(TINY, 2, 10, pruning)
    assert pruning.plan(10, 6).visual_tokens_per_layer() == [10, 10, 6, 3, 3, 3]
    assert f.per_layer == tuple(layer_flops(2 + v, 8, 20) for v in (10, 10, 6, 3, 3, 3))
    stage1 = 2 * 6 * 2 * 8 + 2 * 12 * 8  # merge 2RZd + scores 2 (n_text + n_vis) d
    stage2 = 2 * 12 * 8 + 6 * 8 + 2 * 64 + 2 * 7 * 64  # scores, align R_1 d, query, 7 more keys
    assert f.overhead == stage1 + stage2 == 1648
    assert f.total == sum(f.per_layer) + 1648 and f.recompute == 0


def test_swiftvlm_recompute_after_a_merging_later_stage():
    # stage 2 (before layer 4) merges too: layer 4 computes its 2 text + 3 kept rows' keys again
    # (its merged row changed after scoring); beyond Eq. 19, so in total and not in paper_units.
    pruning = SwiftVLM(layers=(2, 4, 5), keep=(4, 3, 2), merge=(2, 1))
    f = prefill_flops(TINY, 2, 10, pruning)
    assert f.recompute == 2 * (2 + 3) * 64
    assert f.total == sum(f.per_layer) + f.overhead + f.recompute
    assert f.paper_units == sum(f.per_layer) // 2 + f.overhead


def test_drop_only_overhead_hand_worked():
    # PDrop at layers 2 and 4 (keep 5, then 2): only the scores, over the keys present at the layer
    f = prefill_flops(TINY, 2, 10, PDrop(layers=(2, 4), keep=(5, 2)))
    assert f.per_layer == tuple(layer_flops(2 + v, 8, 20) for v in (10, 10, 5, 5, 2, 2))
    assert f.overhead == 2 * (2 + 10) * 8 + 2 * (2 + 5) * 8
    f = prefill_flops(TINY, 2, 10, FastV(layer=3, keep=4))
    assert f.overhead == 2 * 12 * 8


def test_alvts_hand_worked():
    """ALVTS at layers 2 and 5 (keep 4, 1), d = 8, n = 2 + 10 rows, rank 3: Eq. 17 with 4 and 1 visual
    tokens at those layers only; each stage costs its selector's projections 4 n d R and
    attention_importance's two passes over the n (n + 1) / 2 causal logits, 2 n (n + 1) R."""
    pruning = ALVTS(layers=(2, 5), keep=(4, 1), rank=3)
    f = prefill_flops(TINY, 2, 10, pruning)
    assert f.per_layer == tuple(layer_flops(2 + v, 8, 20) for v in (10, 4, 10, 10, 1, 10))
    stage = 4 * 12 * 8 * 3 + 2 * 12 * 13 * 3
    assert selector_flops(12, 8, 3) == stage == 2088
    assert f.overhead == 2 * stage and f.recompute == 0 and f.total == sum(f.per_layer) + 2 * stage
    # the rank: the method's, a given selector's, else min(128, d) (a plan carries none)
    selector = Selector({2: (torch.zeros(8, 5), torch.zeros(8, 5)), 5: (torch.zeros(8, 5), torch.zeros(8, 5))})
    assert prefill_flops(TINY, 2, 10, ALVTS(layers=(2, 5), keep=(4, 1), selector=selector)).overhead == \
        2 * selector_flops(12, 8, 5)
    assert prefill_flops(TINY, 2, 10, pruning.plan(10, 6)).overhead == 2 * selector_flops(12, 8, 8)
    # LLaVA-1.5-7B at T = 192 (keep 180 at layers 2-32), rank 128: the selectors cost 1.3 % of the prefill
    f = prefill_flops(LLAVA_7B, 74, 576, ALVTS(budget=192))
    assert f.overhead == 31 * selector_flops(650, 4096, 128)
    assert 0.012 < f.overhead / f.total < 0.014


def test_plan_object_or_pruning_object():
    pruning = SwiftVLM(layers=(2, 4), budget=5)
    assert prefill_flops(TINY, 2, 10, pruning.plan(10, 6)) == prefill_flops(TINY, 2, 10, pruning)


@pytest.mark.parametrize("make", [lambda b: SwiftVLM(budget=b), lambda b: FastV(budget=b),
                                  lambda b: PDrop(budget=b), lambda b: ALVTS(budget=b)])
def test_monotonic_in_budget(make):
    totals = [prefill_flops(LLAVA_7B, 64, 576, make(b)).total for b in range(150, 397, 6)]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    assert totals[-1] < prefill_flops(LLAVA_7B, 64, 576).total


def test_llava_7b_against_table_1():
    """Paper units (Table 1): vanilla 4.29T fixes n_text = 70; pruned rows land within 0.025T."""
    tera = 1e12
    assert round(prefill_flops(LLAVA_7B, 70, 576).paper_units / tera, 2) == 4.29
    table_1 = [(SwiftVLM(budget=192), 1.75), (SwiftVLM(budget=128), 1.31),
               (FastV(budget=192), 1.71), (FastV(budget=128), 1.29), (PDrop(budget=192), 1.72)]
    for pruning, paper in table_1:
        assert abs(prefill_flops(LLAVA_7B, 70, 576, pruning).paper_units / tera - paper) < 0.025


@pytest.mark.parametrize("args, name", [
    ((dict(hidden_size=8, intermediate_size=20), 2, 3), "text_config"),
    ((dict(TINY, hidden_size=0), 2, 3), "text_config.hidden_size"),
    ((dict(TINY, num_hidden_layers=2.0), 2, 3), "text_config.num_hidden_layers"),
    ((TINY, -1, 3), "n_text"),
    ((TINY, 2, -3), "n_vis"),
    ((TINY, 2, 10, SwiftVLM(layers=(2, 4), keep=(4, 3)).plan(11, 6)), "pruning"),
    ((TINY, 2, 10, FastV(layer=6)), "layers"),
])
def test_bad_input_raises(args, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        prefill_flops(*args)

