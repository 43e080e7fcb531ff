import itertools
import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swiftvlm_kernels.pruning import select_pruning_layers


def area(profile, layers):
    """Numerator of Eq. 7, exactly: sum_{k=0..K} x_{i_k} (i_{k+1} - i_k), i_0 = 2, i_{K+1} = L."""
    x = [Fraction(float(v)) for v in profile]
    bounds = [2, *layers, len(x)]
    return sum(x[i - 1] * (j - i) for i, j in zip(bounds, bounds[1:]))


def brute_force(profile, m, increasing=True):
    """Best layer set by enumeration; key: largest area, then fewer layers, then lexicographic."""
    x = [Fraction(float(v)) for v in profile]
    best = None
    for size in range(m + 1):
        for layers in itertools.combinations(range(3, len(x) + 1), size):
            levels = [x[1]] + [x[i - 1] for i in layers]  # the baseline level is x_2
            if increasing and any(b <= a for a, b in zip(levels, levels[1:])):
                continue
            key = (-area(profile, layers), size, layers)
            best = key if best is None or key < best else best
    return list(best[2])


def check(profile, m):
    got = select_pruning_layers(profile, m)
    assert got == brute_force(profile, m)
    # the increasing constraint never costs area: an unconstrained search picks the same set
    assert got == brute_force(profile, m, increasing=False)
    return got


@given(st.lists(st.integers(0, 4), min_size=3, max_size=10), st.integers(0, 4))
@settings(max_examples=150, deadline=None)
def test_matches_brute_force_integer_profiles_with_ties(profile, m):
    check(profile, m)


@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=3, max_size=10),
       st.integers(0, 4))
@settings(max_examples=100, deadline=None)
def test_matches_brute_force_float_profiles(profile, m):
    check(profile, m)


def test_matches_brute_force_seeded():
    rng = random.Random(0)
    for _ in range(150):
        num_layers = rng.randint(3, 12)
        profile = [rng.random() for _ in range(num_layers)]
        check(profile, rng.randint(0, 4))


def test_hand_made():
    # L = 9, x_2 = 1: [4, 6, 8] gives 1*2 + 3*2 + 5*2 + 7*1 = 25; [3, 6, 8] only 1 + 6 + 10 + 7 = 24
    profile = [0, 1, 2, 3, 2, 5, 1, 7, 3]
    assert check(profile, 3) == [4, 6, 8]
    assert check(profile, 1) == [6]  # 1*4 + 5*3 = 19 beats [4]: 2 + 3*5 = 17 and [8]: 6 + 7 = 13
    assert check(profile, 0) == []


def test_nothing_beats_layer_2():
    assert check([0, 5, 5, 4, 5, 1], 3) == []  # x_{i_1} must exceed x_2
    assert check([1.0] * 8, 3) == []  # a flat profile: every set ties, the empty one is smallest


def test_ties_prefer_fewer_then_lexicographic_layers():
    # [3] and [4] tie: 0*1 + 2*2 = 4 = 0*2 + 4*1 ; [3, 4] gives 2 + 4 = 6, more
    assert check([0, 0, 2, 4, 0], 1) == [3]
    assert check([0, 0, 2, 4, 0], 2) == [3, 4]
    # the last layer spans L - L = 0 layers in Eq. 7 and is never chosen
    assert check([0, 0, 1, 1, 9], 3) == [3]


def paper_like_profile():
    """A LLaVA-1.5-7B-like shape (Fig. 4): early fluctuations, a rise, a peak at 15, a decline."""
    x = [0.30, 0.50, 0.70, 0.62, 0.66, 0.58, 0.64, 0.68, 0.61, 0.67, 0.85, 0.80, 0.84, 0.82,
         0.95]
    return x + [0.93 - 0.015 * i for i in range(17)]


def test_paper_like_profile_selects_3_11_15():
    profile = paper_like_profile()
    assert len(profile) == 32
    assert select_pruning_layers(profile, 3) == [3, 11, 15]
    assert select_pruning_layers(profile, 8) == [3, 11, 15]  # no later layer rises above x_15
    # m = 1: [15] (0.5 * 13 + 0.95 * 17 = 22.65) beats [11] (22.35) and [3] (20.8)
    assert select_pruning_layers(profile, 1) == [15]
    assert select_pruning_layers(profile, 2) == [3, 15]
    assert brute_force(profile, 3) == [3, 11, 15]


@pytest.mark.parametrize("profile, m, name", [
    ([1.0, 2.0], 1, "profile"),
    ([1.0, math.nan, 3.0], 1, "profile"),
    ([1.0, math.inf, 3.0], 1, "profile"),
    ("12345", 1, "profile"),
    ([1.0, "a", 3.0], 1, "profile"),
    (5, 1, "profile"),
    ([1.0, 2.0, 3.0], -1, "m"),
    ([1.0, 2.0, 3.0], 1.0, "m"),
])
def test_bad_input_raises(profile, m, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        select_pruning_layers(profile, m)
