"""`python -m swiftvlm_kernels demo`: the trained tiny model's answers and pictures, and the
random-weight stage view (--random)."""
import re

from swiftvlm_kernels.apps.demo import main
from swiftvlm_kernels.apps.png import read_png


def test_demo_answers_held_out_questions_and_writes_a_picture_per_method(tmp_path, capsys):
    assert main(["--questions", "5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for kind in ("colour", "shape", "count", "location", "coarse"):  # one question of each type
        assert f", {kind}): " in out
    for name in ("vanilla", "SwiftVLM", "FastV", "PDrop", "ALVTS"):
        line = next(x for x in out.splitlines() if x.startswith(f"{name}: "))
        right = int(re.match(rf"{name}: (\d)/5 right", line).group(1))
        assert 0 <= right <= 5 and "% of vanilla's FLOPs" in line
    assert "SwiftVLM: " in out and "+ 6 merged" in out  # the default budget, 1/3: 27 kept + 6 merged
    # ALVTS: 1/3 of 144 per layer on average with layer 1 unpruned: (144 + 11 k) / 12 = 48 -> k = 39
    assert "layers 2-12: each keeps its own 39; selector: rank " in out and "svd+calibration" in out
    for key in ("vanilla", "swiftvlm", "fastv", "pdrop", "alvts"):
        img = read_png(tmp_path / f"{key}.png")
        assert img.shape[0] == 3 and img.shape[1] > 5 * 192  # five rows of 2x-scaled 96 px images
        assert str(tmp_path / f"{key}.png") in out
    # ALVTS: beside each image, its 11 selecting layers' panels and the "how often kept" one, six to a line
    assert read_png(tmp_path / "alvts.png").shape[2] >= 192 + 6 * 96


def test_random_weights_view_prints_stages_flops_and_tokens(capsys):
    assert main(["--random", "--new-tokens", "3", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for text in ("SwiftVLM:", "FastV:", "PDrop:", "stage 1, layer 3: keep 5, merge the rest into 2",
                 "stage 3, layer 15: keep 5, drop the rest", "% of vanilla", "greedy output ids (3 new tokens"):
        assert text in out, text
    rows = [line.split() for line in out.splitlines() if line.startswith("  vanilla ")]
    assert len(rows) == 1 and "(6/6" in rows[0]  # vanilla equals itself on 2 samples x 3 tokens
