"""`python -m swiftvlm_kernels demo`: the trained tiny model's answers and pictures, and the
random-weight stage view (--random)."""
import re

import pytest

from swiftvlm_kernels.apps import figures, synth
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
    # the layers that run on each stage's tokens, 1-indexed, as the pictures label them
    assert "(layer 3: 27 kept + 6 merged; layers 4-5: 27 kept + 6 merged; layers 6-12: 27 kept)" in out
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


@pytest.fixture
def drawn(monkeypatch):
    """What the demo hands each figure function: (function, stage labels, title, legend, rows)."""
    calls = []
    for name in ("kept_tokens_figure", "layer_kept_figure"):
        real = getattr(figures, name)

        def spy(rows, grid, labels, title, *args, _real=real, _name=name, **kw):
            calls.append((_name, list(labels), title, list(kw.get("legend", ())), rows))
            return _real(rows, grid, labels, title, *args, **kw)

        monkeypatch.setattr(figures, name, spy)
    return calls


def test_pictures_say_what_the_terminal_says_and_carry_their_legend(tmp_path, capsys, drawn):
    assert main(["--questions", "5", "--out", str(tmp_path), "--budget", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "budget: 50% of the visual tokens per layer (72.0 of 144; --budget 0.5)" in out
    assert [c[0] for c in drawn] == ["kept_tokens_figure"] * 4 + ["layer_kept_figure"]
    titles = [c[2] for c in drawn]
    for name, t in zip(("vanilla", "SwiftVLM", "FastV", "PDrop", "ALVTS"), titles):  # one title form
        assert re.fullmatch(rf"{name}, (100|50)% of the visual tokens per layer: kept at each (stage|layer)", t), t
    for fn, labels, _, legend, _ in drawn[1:4]:  # the pruned methods' stage labels: the terminal's spans
        line = next(x for x in out.splitlines() if f"({'; '.join(labels)})" in x)
        assert re.match(r"(SwiftVLM|FastV|PDrop): ", line)
    swiftvlm_legend = dict((k, v) for k, v in drawn[1][3])
    assert swiftvlm_legend[figures.MERGED].startswith("merged") and figures.DROPPED in swiftvlm_legend
    assert drawn[1][1] == ["layer 3: 56 kept + 4 merged", "layers 4-5: 56 kept + 4 merged", "layers 6-12: 56 kept"]
    assert figures.MERGED not in dict(drawn[2][3])  # FastV drops, merges nothing
    alvts = drawn[4]
    assert alvts[1] == [f"layer {i}: 65" for i in range(2, 13)]
    assert "layers 2-12: each keeps its own 65" in out and figures.SKIPPED in dict(alvts[3])
    for _, _, _, legend, _ in drawn:
        assert dict(legend)["kept"] and "outlined" in dict(legend)["target"]


def test_a_count_question_outlines_the_objects_it_counts(tmp_path, capsys, drawn):
    assert main(["--questions", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    asked = [re.match(r"  Q\d+ \(held-out #(\d+), (\w+)\)", x) for x in out.splitlines()]
    picked = [synth.sample(1, int(m.group(1))) for m in asked if m]
    rows = drawn[0][4]
    counts = [(s, r["targets"]) for s, r in zip(picked, rows) if s.kind == "count"]
    assert counts and any(s.answer != "zero" for s, _ in counts)  # one count question shown has objects to count
    cell = synth.CELL
    for s, targets in counts:
        counted = [o for o in s.objects if o.colour == s.question[-1]]
        assert synth.NUMBERS[len(counted)] == s.answer and len(targets) == len(counted)
        assert set(targets) == {(o.cell[1] * cell, o.cell[0] * cell, (o.cell[1] + 1) * cell, (o.cell[0] + 1) * cell)
                                for o in counted}


def test_pictures_paths_open_from_where_the_user_stands(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--questions", "1", "--out", "pics"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.endswith("pics/vanilla.png, pics/swiftvlm.png, pics/fastv.png, pics/pdrop.png, pics/alvts.png")
    assert (tmp_path / "pics" / "alvts.png").is_file()


@pytest.mark.parametrize("value, words", [("48", "(a share, not a token count)"), ("0", "in (0, 1]"),
                                          ("third", "such as 0.333"), ("nan", "in (0, 1]")])
def test_budget_is_a_share_checked_by_the_parser(value, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--budget", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --budget: expected a share of the visual tokens" in err and words in err


def test_a_budget_the_methods_cannot_spend_is_refused_before_anything_runs(tmp_path, capsys):
    """A floor (the layers before the first stage run every token) and a ceiling (PDrop's stages keep
    ever fewer): the message names the option, the methods and the range they all run."""
    with pytest.raises(ValueError, match=r"^--budget 0.05: SwiftVLM, FastV, PDrop, ALVTS cannot spend it on this "
                                         r"model's 12 layers; every method runs from 0.1789 to 0.6875$"):
        main(["--budget", "0.05", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"^--budget 0.9: PDrop cannot spend it"):
        main(["--budget", "0.9", "--out", str(tmp_path)])
    assert capsys.readouterr().out == "" and not any(tmp_path.iterdir())
    for edge in ("0.1789", "0.6875"):  # the range's ends run
        assert main(["--budget", edge, "--questions", "1", "--out", str(tmp_path)]) == 0
    with pytest.raises(ValueError, match=r"^--budget 0.05: SwiftVLM, FastV, PDrop cannot spend it on this model's 16"):
        main(["--random", "--budget", "0.05"])
