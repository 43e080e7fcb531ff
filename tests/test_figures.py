"""swiftvlm_kernels.apps.figures: text lands where asked, the plot draws each method's markers at its
points and its intervals as error bars, the kept-token panels keep the kept patches' pixels and fade
the others."""
import pytest
import torch

from swiftvlm_kernels.apps import figures


def test_text_draws_its_glyphs_inside_its_box():
    img = figures.canvas(20, 40)
    figures.text(img, 3, 4, "A1", colour=(0, 0, 0))
    ink = (img[0] == 0).nonzero()
    assert ink[:, 0].min() >= 4 and ink[:, 0].max() < 4 + 7
    assert ink[:, 1].min() >= 3 and ink[:, 1].max() < 3 + figures.text_width("A1")
    # the 'A' glyph's top row is .###.
    assert (img[0, 4, 3:8] == 0).tolist() == [False, True, True, True, False]
    figures.text(img, 38, 18, "W")  # clipped at the edges, no error


def test_plot_marks_each_point_in_its_colour():
    img = figures.accuracy_plot([0.5, 0.25], {"SwiftVLM": [0.9, 0.5], "FastV": [0.8, None]}, ("vanilla", 0.95),
                                "t", width=400, height=300)
    assert img.shape == (3, 300, 400) and img.dtype == torch.uint8
    red = torch.tensor(figures.METHOD_COLOURS["SwiftVLM"], dtype=torch.uint8)[:, None, None]
    blue = torch.tensor(figures.METHOD_COLOURS["FastV"], dtype=torch.uint8)[:, None, None]
    assert (img == red).all(0).sum() > 50 and (img == blue).all(0).sum() > 20
    with pytest.raises(ValueError, match="curves: expected at least one method"):
        figures.accuracy_plot([], {}, None)


def test_plot_draws_each_interval_as_an_error_bar_beside_its_point():
    w, h = 400, 300
    bars = {"SwiftVLM": [(0.7, 0.95), None], "FastV": [(0.6, 0.9), (0.1, 0.3)]}
    img = figures.accuracy_plot([0.5, 0.25], {"SwiftVLM": [0.9, 0.5], "FastV": [0.8, 0.2]}, ("vanilla", 0.95), "t",
                                width=w, height=h, intervals=bars, reference_interval=(0.9, 0.99))
    plain = figures.accuracy_plot([0.5, 0.25], {"SwiftVLM": [0.9, 0.5], "FastV": [0.8, 0.2]}, ("vanilla", 0.95), "t",
                                  width=w, height=h)
    left, right, top, bottom = 64, w - 170, 40, h - 56  # the plot's frame (see accuracy_plot)
    lo, hi = 0.25 - 0.25 * 0.06, 0.5 + 0.25 * 0.06

    def px(b):
        return left + (b - lo) / (hi - lo) * (right - left)

    def py(a):
        return bottom - a * (bottom - top)

    def colour_rows(name, x):
        c = torch.tensor(figures.METHOD_COLOURS[name], dtype=torch.uint8)[:, None]
        return (img[:, :, x] == c).all(0).nonzero().flatten()

    spread = figures.ERROR_BAR_SPREAD
    # FastV (second of two methods) sits spread / 2 right of its budget; its bar spans its interval there
    x = round(px(0.25)) + round(0.5 * spread)
    rows = colour_rows("FastV", x)
    assert rows.min().item() == round(py(0.3)) and rows.max().item() == round(py(0.1))
    x = round(px(0.5)) + round(-0.5 * spread)  # SwiftVLM's bar at 50 %: from 70 % to 95 %
    rows = colour_rows("SwiftVLM", x)
    assert rows.min().item() == round(py(0.95)) and rows.max().item() == round(py(0.7))
    assert colour_rows("SwiftVLM", round(px(0.25)) - round(0.5 * spread)).numel() < 12  # no bar: the marker only
    band = torch.tensor((236, 236, 236), dtype=torch.uint8)[:, None]  # the reference's interval as a band
    assert (img[:, round(py(0.97)), left + 5:left + 20] == band).all()
    assert not (plain[:, round(py(0.97)), left + 5:left + 20] == band).all()


def test_kept_panel_keeps_kept_patches_frames_them_and_fades_the_rest():
    image = torch.randint(100, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    panel = figures.kept_panel(image, 4, torch.tensor([0, 1, 5]), scale=2)
    up = image.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(panel[:, 1:7, 1:7], up[:, 1:7, 1:7])  # patch 0 inside its frame (grid lines aside)
    assert torch.equal(panel[:, 9:15, 9:15], up[:, 9:15, 9:15])  # patch 5 = row 1, column 1
    assert (panel[:, 1:8, 17:24].float().mean() < up[:, 1:8, 17:24].float().mean())  # patch 2 faded
    orange = torch.tensor(figures.KEPT_FRAME, dtype=torch.uint8)[:, None]
    assert (panel[:, 0, 0:16] == orange).all() and (panel[:, 0:8, 0] == orange).all()  # the kept region's border
    assert (panel[:, 1:7, 7:9] != orange[:, :, None]).any(0).all()  # not between patches 0 and 1, both kept
    assert (panel[:, 1:8, 15] == orange).all()  # patch 2, right of patch 1, is not kept
    assert (panel[:, 7, 0:8] == orange).all()  # patch 4 below patch 0 is not kept
    fig = figures.kept_tokens_figure([{"image": image, "kept": [torch.tensor([0])], "caption": "q"}], 4, ["s1"], "T")
    assert fig.dtype == torch.uint8 and fig.shape[0] == 3
    with pytest.raises(ValueError, match="rows: expected at least one question"):
        figures.kept_tokens_figure([], 4, [], "T")


def test_kept_patches_stay_distinguishable_on_a_black_background():
    image = torch.full((3, 16, 16), 10, dtype=torch.uint8)  # the synthetic set's black background
    panel = figures.kept_panel(image, 2, torch.tensor([0]), scale=1).int()
    kept, dropped = panel[:, 1:7, 1:7], panel[:, 9:15, 9:15]
    assert (kept == 10).all()  # as it is ...
    orange = torch.tensor(figures.KEPT_FRAME, dtype=torch.int32)[:, None]
    assert (panel[:, 0, 0:8] == orange).all() and (panel[:, 7, 0:8] == orange).all()  # ... inside its frame
    assert dropped.amax() - dropped.amin() > 100  # the rest textured: stripes, not a flat grey
    merged = figures.kept_panel(image, 2, torch.tensor([0]), scale=1, style=figures.MERGED).int()
    assert torch.equal(merged[:, :8, :8], panel[:, :8, :8]) and not torch.equal(merged[:, 9:15, 9:15], dropped)
    white = figures.kept_panel(torch.full((3, 16, 16), 245, dtype=torch.uint8), 2, torch.tensor([0]), scale=1).int()
    assert white[:, 9:15, 9:15].float().mean() < 150  # on white, the rest clearly darker


def test_targets_are_outlined_white_inside_black_just_outside_the_box():
    image = torch.full((3, 16, 16), 128, dtype=torch.uint8)
    panel = figures.kept_panel(image, 4, None, [(4, 4, 8, 8)], scale=2)
    assert (panel[:, 7, 7:17] == 255).all() and (panel[:, 6, 6:18] == 0).all()
    assert torch.equal(panel[:, 8:16, 8:16], torch.full((3, 8, 8), 128, dtype=torch.uint8))


def test_every_figure_carries_its_legend_strip():
    image = torch.randint(100, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    legend = [("kept", "kept"), (figures.MERGED, "merged"), (figures.DROPPED, "dropped"), ("target", "answer")]
    title = "a title wide enough for the legend"  # a figure this wide shows the legend on one line
    fig = figures.kept_tokens_figure([{"image": image, "kept": [torch.tensor([0])]}], 4, ["s1"], title, legend=legend)
    strip = figures.legend_strip(legend, fig.shape[2] - 20)
    assert torch.equal(fig[:, 28:28 + figures.LEGEND_HEIGHT, 10:fig.shape[2] - 10], strip)
    assert fig.shape[2] - 20 >= figures.legend_width(legend)
    swatch = figures.kept_panel(figures._SWATCH, 1, torch.tensor([0]))
    assert torch.equal(strip[:, 4:20, 0:16], swatch)  # the kept swatch is drawn as a kept patch is
    merged_x = 22 + figures.text_width("kept") + 16
    assert torch.equal(strip[:, 4:20, merged_x:merged_x + 16],
                       figures.kept_panel(figures._SWATCH, 1, torch.tensor([], dtype=torch.long), style=figures.MERGED))
    plain = figures.kept_tokens_figure([{"image": image, "kept": [torch.tensor([0])]}], 4, ["s1"], title, legend=())
    assert fig.shape[1] == plain.shape[1] + figures.LEGEND_HEIGHT + 6
    rows = [{"image": image, "kept": [torch.tensor([0])]}]
    narrow = figures.layer_kept_figure(rows, 4, ["l2"], "T", legend=legend)
    one_line = figures.layer_kept_figure(rows, 4, ["l2"], "T", legend=legend[:1])
    assert narrow.shape[1] >= one_line.shape[1] + figures.LEGEND_HEIGHT  # wrapped: 4 entries on 2+ lines
    with pytest.raises(ValueError, match="entries: expected swatches"):
        figures.legend_strip([("sparkle", "x")], 100)


def test_layer_figure_has_a_panel_per_layer_and_a_count_panel():
    image = torch.randint(100, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    kept = [torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([1, 15])]
    fig = figures.layer_kept_figure([{"image": image, "kept": kept, "caption": "q"}], 4, ["l2", "l3", "l4"], "T",
                                    columns=2, scale=2, legend=())
    gap, label, head = 8, 11, 30  # the figure's layout without a legend: the 2x image, then 1x panels, two per line
    x0 = 2 * gap + 32
    for i, k in enumerate(kept):
        x, y = x0 + (i % 2) * (16 + gap), head + (i // 2) * (16 + label + gap) + label
        want = figures.kept_panel(image, 4, k, scale=1, style=figures.SKIPPED)
        assert torch.equal(fig[:, y:y + 16, x:x + 16], want), i
    x, y = x0 + 16 + gap, head + 16 + label + gap + label  # the 4th panel: how often each patch was kept
    count = torch.zeros(16)
    for k in kept:
        count[k] += 1
    want = figures.kept_panel(image, 4, None, scale=1, share=count / count.max(), style=figures.SKIPPED)
    assert torch.equal(fig[:, y:y + 16, x:x + 16], want)
    never = figures.kept_panel(image, 4, torch.tensor([0, 1, 2, 15]), scale=1, style=figures.SKIPPED)
    assert torch.equal(want[:, 9:15, 1:7], never[:, 9:15, 1:7])  # patch 4, never kept: faded alike
    assert (want[0, 1:7, 9:15].int() - image[0, 1:7, 9:15].int()).abs().sum() > 0  # patch 1, kept thrice: tinted
    with pytest.raises(ValueError, match="rows: expected at least one question"):
        figures.layer_kept_figure([], 4, [], "T")


def test_a_plot_of_differences_has_signed_point_ticks_and_its_bars_where_its_range_puts_them():
    assert [label for _, label in figures._ticks(-0.2, 0.05)] == ["-20", "-15", "-10", "-5", "0", "+5"]
    assert [label for _, label in figures._ticks(0.0, 1.0)] == ["0%", "20%", "40%", "60%", "80%", "100%"]
    w, h = 400, 300
    img = figures.accuracy_plot([0.5], {"PDrop": [-0.1]}, ("vanilla (0)", 0.0), "t", width=w, height=h,
                                intervals={"PDrop": [(-0.15, -0.05)]}, y_range=(-0.2, 0.05), ylabel="points")
    top, bottom = 40, h - 56

    def py(a):
        return bottom - (a + 0.2) / 0.25 * (bottom - top)

    green = torch.tensor(figures.METHOD_COLOURS["PDrop"], dtype=torch.uint8)[:, None]
    left, right = 64, w - 170
    x = round(left + (0.5 - 0.45) / 0.1 * (right - left))  # a lone budget: padded by 0.05 each side
    rows = (img[:, :, x] == green).all(0).nonzero().flatten()
    assert rows.min().item() == round(py(-0.05)) and rows.max().item() == round(py(-0.15))
    grey = torch.tensor(figures.GREY, dtype=torch.uint8)[:, None]
    assert (img[:, round(py(0.0)), left:left + 6] == grey).all()  # vanilla's level, dashed at 0
