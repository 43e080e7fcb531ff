"""Pictures without a plotting library: a 5 x 7 bitmap font, lines and boxes on uint8 [3, H, W]
canvases, the accuracy-against-budget plot of the evaluation (with error bars), and the kept-token
panels of the demo (the SwiftVLM paper's Fig. 6 style; for ALVTS, whose every layer keeps its own
tokens, a small panel per layer), each figure with its own legend strip. Written as PNG by
`swiftvlm_kernels.apps.png`."""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

# 5 x 7 glyphs, one int per row, bit 4 = the leftmost column. Letters are drawn in capitals.
_GLYPHS = {
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (30, 17, 17, 17, 17, 17, 30), "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17), "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17), "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4), "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8), ":": (0, 12, 12, 0, 12, 12, 0),
    "-": (0, 0, 0, 31, 0, 0, 0), "%": (24, 25, 2, 4, 8, 19, 3), "(": (2, 4, 8, 8, 8, 4, 2),
    ")": (8, 4, 2, 2, 2, 4, 8), "/": (0, 1, 2, 4, 8, 16, 0), "=": (0, 0, 31, 0, 31, 0, 0),
    "?": (14, 17, 1, 2, 4, 0, 4), "_": (0, 0, 0, 0, 0, 0, 31), "+": (0, 4, 4, 31, 4, 4, 0),
    "<": (2, 4, 8, 16, 8, 4, 2), ">": (8, 4, 2, 1, 2, 4, 8), "'": (4, 4, 8, 0, 0, 0, 0),
    "!": (4, 4, 4, 4, 4, 0, 4), "*": (0, 4, 21, 14, 21, 4, 0), "#": (10, 10, 31, 10, 31, 10, 10),
}
_BITMAPS = {c: torch.tensor([[(row >> (4 - i)) & 1 for i in range(5)] for row in rows], dtype=torch.bool)
            for c, rows in _GLYPHS.items()}

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
METHOD_COLOURS = {"vanilla": (60, 60, 60), "SwiftVLM": (214, 39, 40), "FastV": (31, 119, 180),
                  "PDrop": (44, 160, 44), "ALVTS": (148, 103, 189)}
ERROR_BAR_SPREAD = 5  # pixels between the methods' points (and error bars) at one budget
_PALETTE = ((255, 127, 14), (140, 86, 75), (227, 119, 194), (23, 190, 207))


def canvas(height: int, width: int, colour=WHITE) -> Tensor:
    """A uint8 [3, height, width] canvas filled with `colour`."""
    return torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, height, width).clone()


def text_width(s: str, scale: int = 1) -> int:
    """Pixels that `text` takes horizontally for `s`."""
    return len(s) * 6 * scale


def text(img: Tensor, x: int, y: int, s: str, colour=BLACK, scale: int = 1) -> None:
    """Draw `s` with its top-left corner at (x, y); glyphs are 5 x 7 cells of `scale` pixels, 1 apart;
    what falls outside the canvas is clipped."""
    fill = torch.tensor(colour, dtype=torch.uint8)[:, None]
    H, W = img.shape[1:]
    for i, ch in enumerate(s):
        bitmap = _BITMAPS.get(ch.upper(), _BITMAPS["?"])
        if scale > 1:
            bitmap = bitmap.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        x0 = x + i * 6 * scale
        ys, xs = bitmap.nonzero(as_tuple=True)
        ys, xs = ys + y, xs + x0
        ok = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        img[:, ys[ok], xs[ok]] = fill


def rect(img: Tensor, x0: int, y0: int, x1: int, y1: int, colour, fill: bool = True, width: int = 1) -> None:
    """A filled box, or its outline `width` pixels thick, over [x0, x1) x [y0, y1) (clipped)."""
    H, W = img.shape[1:]
    x0, x1, y0, y1 = max(0, x0), min(W, x1), max(0, y0), min(H, y1)
    if x0 >= x1 or y0 >= y1:
        return
    c = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    if fill:
        img[:, y0:y1, x0:x1] = c
        return
    img[:, y0:min(y1, y0 + width), x0:x1] = c
    img[:, max(y0, y1 - width):y1, x0:x1] = c
    img[:, y0:y1, x0:min(x1, x0 + width)] = c
    img[:, y0:y1, max(x0, x1 - width):x1] = c


def line(img: Tensor, x0: float, y0: float, x1: float, y1: float, colour, width: int = 2) -> None:
    """A straight line `width` pixels thick from (x0, y0) to (x1, y1) (clipped)."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    t = torch.linspace(0, 1, n)
    xs = (x0 + (x1 - x0) * t).round().long()
    ys = (y0 + (y1 - y0) * t).round().long()
    H, W = img.shape[1:]
    c = torch.tensor(colour, dtype=torch.uint8)[:, None]
    for dy in range(-(width // 2), width - width // 2):
        for dx in range(-(width // 2), width - width // 2):
            yy, xx = ys + dy, xs + dx
            ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            img[:, yy[ok], xx[ok]] = c


def method_colour(name: str, i: int = 0):
    """The plot colour of a method (the known four fixed, others from a palette by position)."""
    return METHOD_COLOURS.get(name, _PALETTE[i % len(_PALETTE)])


def _ticks(low: float, high: float) -> list[tuple[float, str]]:
    """(value, label) of the y grid: 0 to 100 % by 20 for (0, 1), else round steps of at most 8 ticks,
    in points with a sign when the range spans 0."""
    if (low, high) == (0.0, 1.0):
        return [(t / 100, f"{t}%") for t in range(0, 101, 20)]
    step = next((v for v in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5) if (high - low) / v <= 8), 1.0)
    first = math.ceil(low / step - 1e-9)
    values = [round(i * step, 6) for i in range(first, math.floor(high / step + 1e-9) + 1)]
    signed = low < 0 < high
    return [(v, f"{100 * v:+.0f}" if signed and v else f"{100 * v:.0f}") for v in values]


def accuracy_plot(budgets: Sequence[float], curves: Mapping[str, Sequence[Optional[float]]],
                  reference: Optional[tuple[str, float]] = None, title: str = "",
                  width: int = 720, height: int = 460,
                  intervals: Optional[Mapping[str, Sequence[Optional[tuple[float, float]]]]] = None,
                  reference_interval: Optional[tuple[float, float]] = None, y_range: tuple[float, float] = (0.0, 1.0),
                  ylabel: str = "accuracy", interval_note: str = "95% CI (Wilson)") -> Tensor:
    """uint8 [3, height, width]: accuracy (0..1, drawn in %) against budget (fraction of the visual
    tokens per layer, drawn in %), one line with markers per method (None: a missing point, e.g.
    an infeasible budget), `reference` = (label, accuracy) as a dashed level (the unpruned model).
    intervals: per method, per budget, (low, high) drawn as an error bar with caps in the method's
    colour (None: no bar); the methods' points at one budget are set a few pixels apart so that
    their bars do not overlap. reference_interval: the reference's, drawn as a grey band.
    y_range: the values at the bottom and top (default 0 to 1; another range gets round ticks, signed
    when it spans 0: a plot of differences, in points); ylabel above the axis; interval_note: what
    the legend calls the bars."""
    if not budgets or not curves:
        raise ValueError("curves: expected at least one method with one budget")
    img = canvas(height, width)
    left, right, top, bottom = 64, width - 170, 40, height - 56
    text(img, (width - text_width(title, 2)) // 2, 10, title, scale=2)
    lo, hi = min(budgets), max(budgets)
    pad = (hi - lo) * 0.06 or 0.05
    lo, hi = max(0.0, lo - pad), hi + pad

    def px(b):
        return left + (b - lo) / (hi - lo) * (right - left)

    ylo, yhi = y_range

    def py(a):
        return bottom - (a - ylo) / (yhi - ylo) * (bottom - top)

    if reference_interval is not None:  # the reference's interval: a light band under everything
        rect(img, left + 1, round(py(reference_interval[1])), right, round(py(reference_interval[0])) + 1,
             (236, 236, 236))
    for tick, label in _ticks(ylo, yhi):  # y grid and labels
        y = round(py(tick))
        rect(img, left, y, right, y + 1, (225, 225, 225))
        text(img, left - 8 - text_width(label), y - 3, label)
    for b in budgets:  # x ticks at the budgets
        x = round(px(b))
        rect(img, x, bottom, x + 1, bottom + 5, BLACK)
        label = f"{100 * b:.0f}%"
        text(img, x - text_width(label) // 2, bottom + 9, label)
    rect(img, left, top, left + 1, bottom + 1, BLACK)
    rect(img, left, bottom, right + 1, bottom + 1, BLACK)
    xlabel = "visual tokens kept per layer (share of all)"
    text(img, (left + right - text_width(xlabel)) // 2, bottom + 26, xlabel)
    text(img, 8, top - 16, ylabel)
    if reference is not None:
        y = py(reference[1])
        for x in range(left, right, 12):
            line(img, x, y, min(x + 6, right), y, GREY, 2)
    legend_y = top + 6
    spread = ERROR_BAR_SPREAD if intervals else 0
    for i, (name, values) in enumerate(curves.items()):
        colour = method_colour(name, i)
        dx = round((i - (len(curves) - 1) / 2) * spread)
        bars = list((intervals or {}).get(name) or [None] * len(budgets))
        for b, bar in zip(budgets, bars):
            if bar is not None:
                x = round(px(b)) + dx
                y0, y1 = round(py(bar[1])), round(py(bar[0]))
                rect(img, x, y0, x + 1, y1 + 1, colour)
                rect(img, x - 3, y0, x + 4, y0 + 1, colour)  # caps
                rect(img, x - 3, y1, x + 4, y1 + 1, colour)
        points = [(px(b) + dx, py(v)) for b, v in zip(budgets, values) if v is not None]
        for (xa, ya), (xb, yb) in zip(points, points[1:]):
            line(img, xa, ya, xb, yb, colour, 2)
        for x, y in points:
            rect(img, round(x) - 3, round(y) - 3, round(x) + 4, round(y) + 4, colour)
        rect(img, right + 16, legend_y + 1, right + 34, legend_y + 5, colour)
        text(img, right + 40, legend_y, name)
        legend_y += 16
    if reference is not None:
        for x in range(right + 16, right + 34, 8):
            line(img, x, legend_y + 3, x + 4, legend_y + 3, GREY, 2)
        text(img, right + 40, legend_y, reference[0])
        legend_y += 16
    if intervals or reference_interval is not None:
        legend_y += 8
        rect(img, right + 24, legend_y - 2, right + 25, legend_y + 9, BLACK)
        rect(img, right + 21, legend_y - 2, right + 28, legend_y - 1, BLACK)
        rect(img, right + 21, legend_y + 8, right + 28, legend_y + 9, BLACK)
        text(img, right + 40, legend_y, interval_note)
        if reference_interval is not None:
            legend_y += 16
            rect(img, right + 16, legend_y - 1, right + 34, legend_y + 8, (236, 236, 236))
            text(img, right + 40, legend_y, "all tokens' CI")
    return img


KEPT_FRAME = (255, 150, 0)  # the outline of the kept patches: orange, a colour no synthetic object or background has
DROPPED, MERGED, SKIPPED = "dropped", "merged", "skipped"  # what a panel's faded patches are (see kept_panel)


def _faded(img: Tensor, style: str) -> Tensor:
    """fp32 [3, H, W]: `img` darkened and textured so that it reads as not kept on any background (a
    black background's kept patches are darker than a plain fade): diagonal stripes for dropped or
    skipped patches, a dot grid for merged ones; the texture light on dark pixels, dark on light ones."""
    dark = img.float() * 0.35 + 20
    H, W = img.shape[1:]
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    mark = (y % 4 == 1) & (x % 4 == 1) if style == MERGED else (x + y) % 6 == 0
    ink = torch.where(dark.mean(0, keepdim=True) < 100, 170.0, 30.0).expand_as(dark)
    return torch.where(mark[None], ink, dark)


def kept_panel(image: Tensor, grid: int, kept: Optional[Tensor], targets: Sequence[tuple[int, int, int, int]] = (),
               scale: int = 2, share: Optional[Tensor] = None, style: str = DROPPED) -> Tensor:
    """The image (uint8 [3, H, W]) upscaled by `scale`, with the patches of a `grid` x `grid` patch
    grid that are NOT in `kept` (visual-token indices, row-major; None: all kept) darkened and
    textured (`style`: DROPPED or SKIPPED, stripes; MERGED, dots), the kept ones as they are inside an
    orange frame around the kept region, and `targets` (pixel boxes x0, y0, x1, y1 of the unscaled
    image) outlined just outside in white then black (seen on any background).
    share: instead of kept, each patch's share in [0, 1] (fp32 [grid * grid]): 0 faded, 1 the image
    tinted orange, in between a blend (no frame)."""
    img = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2).clone()
    H, W = img.shape[1:]
    ph, pw = H // grid, W // grid
    frame = kept is not None and share is None
    if kept is not None and share is None:
        share = torch.zeros(grid * grid)
        share[kept.long().cpu()] = 1.0
    if share is not None:
        on = share.float().view(grid, grid).repeat_interleave(ph, 0).repeat_interleave(pw, 1)
        faded = _faded(img, style)
        full = img.float()
        if not frame:  # a share: tinted orange as it grows, so that it shows on a black background too
            full = full * 0.6 + torch.tensor(KEPT_FRAME, dtype=torch.float32)[:, None, None] * 0.4
        img = (faded + (full - faded) * on[None]).round().to(torch.uint8)
        for i in range(1, grid):  # faint patch grid
            img[:, i * ph, :] = torch.where(img[:, i * ph, :] > 60, img[:, i * ph, :] - 30, img[:, i * ph, :])
            img[:, :, i * pw] = torch.where(img[:, :, i * pw] > 60, img[:, :, i * pw] - 30, img[:, :, i * pw])
    if frame and share is not None:  # the kept region's border, one pixel inside it
        cells = share.view(grid, grid) > 0
        pad = torch.nn.functional.pad(cells, (1, 1, 1, 1))
        c = torch.tensor(KEPT_FRAME, dtype=torch.uint8)[:, None]
        for r, col in cells.nonzero().tolist():
            y0, x0 = r * ph, col * pw
            if not pad[r, col + 1]:  # the neighbour above is not kept
                img[:, y0, x0:x0 + pw] = c
            if not pad[r + 2, col + 1]:
                img[:, y0 + ph - 1, x0:x0 + pw] = c
            if not pad[r + 1, col]:
                img[:, y0:y0 + ph, x0] = c
            if not pad[r + 1, col + 2]:
                img[:, y0:y0 + ph, x0 + pw - 1] = c
    for x0, y0, x1, y1 in targets:
        rect(img, x0 * scale - 2, y0 * scale - 2, x1 * scale + 2, y1 * scale + 2, BLACK, fill=False, width=1)
        rect(img, x0 * scale - 1, y0 * scale - 1, x1 * scale + 1, y1 * scale + 1, WHITE, fill=False, width=1)
    return img


LEGEND_HEIGHT = 24  # a legend strip's height in pixels
_SWATCH = torch.tensor((40, 80, 220), dtype=torch.uint8)[:, None, None].expand(3, 8, 8)  # a blue patch


def legend_strip(entries: Sequence[tuple[str, str]], width: int) -> Tensor:
    """uint8 [3, LEGEND_HEIGHT, width]: each entry (swatch, text) as a 16 x 16 swatch drawn the way the
    panels draw it, then its text, left to right (wrapping is the caller's: entries past `width` are
    clipped). Swatches: "kept" (a framed patch), DROPPED / SKIPPED (striped), MERGED (dotted),
    "target" (the outline of the answer's patches), "share" (a patch faded half-way)."""
    img = canvas(LEGEND_HEIGHT, width)
    x = 0
    for swatch, label in entries:
        if swatch == "kept":
            patch = kept_panel(_SWATCH, 1, torch.tensor([0]))
        elif swatch in (DROPPED, SKIPPED, MERGED):
            patch = kept_panel(_SWATCH, 1, torch.tensor([], dtype=torch.long), style=swatch)
        elif swatch == "share":
            patch = kept_panel(_SWATCH, 1, None, share=torch.tensor([0.5]))
        elif swatch == "target":
            patch = canvas(16, 16, (128, 128, 128))
            rect(patch, 3, 3, 13, 13, BLACK, fill=False)
            rect(patch, 4, 4, 12, 12, WHITE, fill=False)
        else:
            raise ValueError(f"entries: expected swatches kept, {DROPPED}, {SKIPPED}, {MERGED}, target or share, "
                             f"got {swatch!r}")
        if x + 16 <= width:
            img[:, 4:20, x:x + 16] = patch
        text(img, x + 22, 8, label)
        x += 22 + text_width(label) + 16
    return img


def legend_width(entries: Sequence[tuple[str, str]]) -> int:
    """Pixels a legend strip of `entries` needs to show them all."""
    return sum(22 + text_width(label) + 16 for _, label in entries) - 16


DEFAULT_LEGEND = (("kept", "kept"), (DROPPED, "dropped"), ("target", "the answer's patches"))


def _framed(title: str, legend: Sequence[tuple[str, str]], width: int, height: int, gap: int) -> tuple[Tensor, int]:
    """A canvas of `width` (widened for the title and legend) and `height` plus the legend's rows,
    the title and the legend strip drawn; returns it and the y where the rows start."""
    room = max(width, text_width(title, 2) + 2 * gap) - 2 * gap
    rows: list = [[]]
    for entry in legend:  # as many entries to a line as fit the figure
        if rows[-1] and legend_width(rows[-1] + [entry]) > room:
            rows.append([])
        rows[-1].append(entry)
    width = max(width, text_width(title, 2) + 2 * gap, *(legend_width(r) + 2 * gap for r in rows))
    lines = len([r for r in rows if r])
    head = 30 + (lines * LEGEND_HEIGHT + 6 if lines else 0)
    img = canvas(height + head - 30, width)
    text(img, gap, 8, title, scale=2)
    for i, r in enumerate(x for x in rows if x):
        img[:, 28 + i * LEGEND_HEIGHT:28 + (i + 1) * LEGEND_HEIGHT, gap:width - gap] = legend_strip(r, width - 2 * gap)
    return img, head


def kept_tokens_figure(rows: Sequence[dict], grid: int, stage_labels: Sequence[str], title: str,
                       scale: int = 2, legend: Sequence[tuple[str, str]] = DEFAULT_LEGEND,
                       styles: Sequence[str] = ()) -> Tensor:
    """One figure: the title, a legend strip (`legend`, see legend_strip), then per row (a question)
    the image and one panel per stage showing the visual tokens kept there. Each row dict: image
    (uint8 [3, H, W]), kept (a list, per stage, of index tensors), targets (boxes, see kept_panel),
    caption (a line under the row). styles: per stage, how its other patches are drawn (DROPPED,
    MERGED; default DROPPED)."""
    if not rows:
        raise ValueError("rows: expected at least one question")
    H, W = rows[0]["image"].shape[1:]
    ph, pw = H * scale, W * scale
    gap, foot = 10, 22
    cols = 1 + len(stage_labels)
    img, head = _framed(title, legend, gap + cols * (pw + gap), 30 + len(rows) * (ph + 14 + foot) + gap, gap)
    width = img.shape[2]
    styles = list(styles) + [DROPPED] * (len(stage_labels) - len(styles))
    y = head
    for row in rows:
        labels = ["image"] + list(stage_labels)
        panels = [kept_panel(row["image"], grid, None, row.get("targets", ()), scale)]
        panels += [kept_panel(row["image"], grid, k, row.get("targets", ()), scale, style=st)
                   for k, st in zip(row["kept"], styles)]
        for c, (label, panel) in enumerate(zip(labels, panels)):
            x = gap + c * (pw + gap)
            text(img, x, y, label[: pw // 6])
            img[:, y + 12:y + 12 + ph, x:x + pw] = panel
        text(img, gap, y + 14 + ph + 4, row.get("caption", "")[: (width - 2 * gap) // 6])
        y += ph + 14 + foot
    return img


def layer_kept_figure(rows: Sequence[dict], grid: int, layer_labels: Sequence[str], title: str, columns: int = 6,
                      scale: int = 2, legend: Sequence[tuple[str, str]] = DEFAULT_LEGEND) -> Tensor:
    """One figure for a method whose every layer keeps its own tokens (ALVTS): the title, a legend
    strip, then per row (a question) the image (upscaled by `scale`), then a block of small panels
    (the image's own size), `columns` per line: one per layer with the tokens it kept (the others
    striped: SKIPPED), and a last one where each patch is as bright as the number of layers that
    kept it (the most kept: fully bright, tinted orange; see kept_panel's share). Row dicts as for kept_tokens_figure (kept: one index
    tensor per layer)."""
    if not rows:
        raise ValueError("rows: expected at least one question")
    H, W = rows[0]["image"].shape[1:]
    gap, label, foot = 8, 11, 20
    panels = len(layer_labels) + 1
    lines = -(-panels // columns)
    block_h = max(H * scale + label, lines * (H + label + gap) - gap)
    img, head = _framed(title, legend, 2 * gap + W * scale + gap + columns * (W + gap),
                        30 + len(rows) * (block_h + foot) + gap, gap)
    width = img.shape[2]
    y = head
    for row in rows:
        targets = row.get("targets", ())
        text(img, gap, y, "image")
        img[:, y + label:y + label + H * scale, gap:gap + W * scale] = kept_panel(row["image"], grid, None, targets, scale)
        share = torch.zeros(grid * grid)
        for k in row["kept"]:
            share[k.long().cpu()] += 1.0
        share /= share.max().clamp_min(1.0)
        small = [kept_panel(row["image"], grid, k, targets, 1, style=SKIPPED) for k in row["kept"]]
        small.append(kept_panel(row["image"], grid, None, targets, 1, share=share, style=SKIPPED))
        for i, (name, panel) in enumerate(zip(list(layer_labels) + ["how often kept"], small)):
            x = 2 * gap + W * scale + (i % columns) * (W + gap)
            top = y + (i // columns) * (H + label + gap)
            text(img, x, top, name[: W // 6])
            img[:, top + label:top + label + H, x:x + W] = panel
        text(img, gap, y + block_h + 4, row.get("caption", "")[: (width - 2 * gap) // 6])
        y += block_h + foot
    return img
