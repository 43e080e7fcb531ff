"""A procedural, seeded visual question answering task whose answers depend on a few patches.

An image is a G x G grid of cells on a plain background (default 4 x 4 cells of 24 x 24 pixels:
96 x 96 pixels, 144 patches of 8 x 8 for a ViT with patch size 8, each cell exactly 3 x 3 patches).
A few cells (2 to 5) hold one object each: a coloured shape (square, circle, triangle, cross) drawn
inside its cell, so an object's pixels fall in its cell's 9 patches (1/16 of the image) and nowhere
else. Questions:

  colour    "what colour is the <shape>"           (that shape occurs once)   -> a colour word
  shape     "what shape is <colour>"               (that colour occurs once)  -> a shape word
  count     "how many objects are <colour>"                                   -> zero .. five
  location  "where is the <colour> <shape>"        (RefCOCO-like)             -> the cell, r<i>c<j>
  coarse    "what colour is the background"        (every patch shows it)     -> a colour word

A question ends with the word that names what to look at, and carries no "?" or answer template:
the prompt's last token (whose attention prunes) is that word. (With a trailing "?", a 12-layer model
trained for 20 CPU minutes did not learn to carry the question into it: colour questions stayed at
0 % after 300 steps; see tools/train_tiny.py.)

Fine-grained answers (colour, shape, location, count) depend on the few patches of the objects in
question; the coarse one does not. Every answer is one word of a fixed vocabulary (`VOCAB`), so a
model answers with one token.

Determinism: sample i of split seed s is drawn from random.Random(f"swiftvlm-synth:{s}:{i}"): the
same on every machine and Python version (string seeds are hashed with SHA-512), independent of
the other samples, and never of global state.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190), "cyan": (40, 200, 210)}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245), "gray": (128, 128, 128)}
SHAPES = ("square", "circle", "triangle", "cross")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
KINDS = ("colour", "shape", "count", "location", "coarse")
FINE_KINDS = ("colour", "shape", "count", "location")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
WORDS = ("what", "colour", "is", "the", "shape", "object", "how", "many", "objects", "where", "background", "?", "are")


GRID, CELL = 4, 24  # the default image: GRID x GRID cells of CELL x CELL pixels


def _cells(grid: int) -> tuple[str, ...]:
    return tuple(f"r{r}c{c}" for r in range(grid) for c in range(grid))


def vocabulary(grid: int = GRID) -> tuple[str, ...]:
    """The word vocabulary (token id = index); the image token is the last id, `len(vocab)`."""
    words = list(SPECIALS) + list(WORDS) + sorted(COLOURS) + sorted(BACKGROUNDS) + list(SHAPES) + list(NUMBERS)
    words += list(_cells(grid))
    seen: dict[str, None] = {}
    for w in words:  # "colour" / "shape" are question words too: keep the first
        seen.setdefault(w, None)
    return tuple(seen)


VOCAB = vocabulary()


@dataclass(frozen=True)
class Obj:
    """One object: its colour, shape and cell (row, column)."""
    colour: str
    shape: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class Sample:
    """One question about one image. `image` uint8 [3, H, W]; `answer` one vocabulary word."""
    image: Tensor
    objects: tuple[Obj, ...]
    background: str
    kind: str
    question: tuple[str, ...]
    answer: str

    def cells_in_question(self) -> tuple[tuple[int, int], ...]:
        """The cells whose objects the answer depends on (empty for the coarse question)."""
        if self.kind == "coarse":
            return ()
        if self.kind == "colour":
            return tuple(o.cell for o in self.objects if o.shape == self.question[-1])
        if self.kind == "shape":
            return tuple(o.cell for o in self.objects if o.colour == self.question[-1])
        if self.kind == "count":
            return tuple(o.cell for o in self.objects)  # every object counts (matching or not)
        colour, shape = self.question[-2], self.question[-1]
        return tuple(o.cell for o in self.objects if (o.colour, o.shape) == (colour, shape))


def _mask(shape: str, size: int) -> Tensor:
    """bool [size, size]: the shape's pixels inside a cell of `size` pixels (a 2-pixel margin)."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    m, c = 2.0, (size - 1) / 2
    inside = (y >= m) & (y <= size - 1 - m) & (x >= m) & (x <= size - 1 - m)
    if shape == "square":
        return inside
    if shape == "circle":
        return (y - c) ** 2 + (x - c) ** 2 <= (c - m + 0.5) ** 2
    if shape == "triangle":  # apex at the top, base at the bottom
        return inside & ((x - c).abs() <= (y - m) / 2 + 0.5)
    if shape == "cross":
        return inside & (((x - c).abs() <= size / 8) | ((y - c).abs() <= size / 8))
    raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")


def render(objects: tuple[Obj, ...], background: str, grid: int = GRID, cell: int = CELL) -> Tensor:
    """uint8 [3, grid * cell, grid * cell]: the background and each object in its cell."""
    size = grid * cell
    image = torch.tensor(BACKGROUNDS[background], dtype=torch.uint8)[:, None, None].expand(3, size, size).clone()
    for o in objects:
        r, c = o.cell
        block = image[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
        colour = torch.tensor(COLOURS[o.colour], dtype=torch.uint8)[:, None]
        block[:, _mask(o.shape, cell)] = colour
    return image


def sample(seed: int, index: int, *, grid: int = GRID, cell: int = CELL, kind: Optional[str] = None,
           max_objects: int = 5) -> Sample:
    """Sample `index` of the split `seed` (module docstring); `kind` forces the question type.

    Raises
    ------
    ValueError
        an unknown kind, a grid too small for the objects, or max_objects outside [2, 5].
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS} or None, got {kind!r}")
    if not 2 <= max_objects <= 5 or grid * grid < max_objects:
        raise ValueError(f"max_objects: expected 2..5 objects that fit a {grid} x {grid} grid, got {max_objects}")
    rng = random.Random(f"swiftvlm-synth:{seed}:{index}")
    kind = kind or rng.choice(KINDS)
    background = rng.choice(sorted(BACKGROUNDS))
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], rng.randint(2, max_objects))
    objects = tuple(Obj(rng.choice(sorted(COLOURS)), rng.choice(SHAPES), cell_) for cell_ in cells)
    # a target object whose description is unique in the image, for the question types that need one
    target = rng.choice(objects)
    question: tuple[str, ...]
    if kind == "colour":
        objects = tuple(o if o is target or o.shape != target.shape else Obj(o.colour, _other(rng, SHAPES, target.shape),
                                                                               o.cell) for o in objects)
        question, answer = ("what", "colour", "is", "the", target.shape), target.colour
    elif kind == "shape":
        objects = tuple(o if o is target or o.colour != target.colour else
                        Obj(_other(rng, sorted(COLOURS), target.colour), o.shape, o.cell) for o in objects)
        question, answer = ("what", "shape", "is", target.colour), target.shape
    elif kind == "location":
        objects = tuple(o if o is target or (o.colour, o.shape) != (target.colour, target.shape) else
                        Obj(_other(rng, sorted(COLOURS), target.colour), o.shape, o.cell) for o in objects)
        question, answer = (("where", "is", "the", target.colour, target.shape),
                            f"r{target.cell[0]}c{target.cell[1]}")
    elif kind == "count":
        colour = rng.choice(sorted(COLOURS))
        n = sum(o.colour == colour for o in objects)
        question, answer = ("how", "many", "objects", "are", colour), NUMBERS[n]
    else:
        question, answer = ("what", "colour", "is", "the", "background"), background
    return Sample(render(objects, background, grid, cell), objects, background, kind, question, answer)


def more_questions(s: Sample, k: int, seed: int, index: int) -> list[tuple[str, tuple[str, ...], str]]:
    """k further (kind, question, answer) triples about sample `index` of split `seed`'s image (for
    multi-turn training): kinds drawn at random, each asked only when its target is unique in the
    image as it is (the objects are not changed), never a question asked before about it (the
    sample's own included: an answer is never there to copy); seeded by (seed, index) like `sample`.

    Raises
    ------
    ValueError
        k larger than the distinct questions the image allows.
    """
    rng = random.Random(f"swiftvlm-synth-more:{seed}:{index}")
    out: list[tuple[str, tuple[str, ...], str]] = []
    asked = {s.question}
    objects = s.objects
    for _ in range(1000 * (k + 1)):
        if len(out) == k:
            break
        kind, answer = rng.choice(KINDS), ""
        question: Optional[tuple[str, ...]] = None
        if kind == "colour":
            unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
            if unique:
                t = rng.choice(unique)
                question, answer = ("what", "colour", "is", "the", t.shape), t.colour
        elif kind == "shape":
            unique = [o for o in objects if sum(p.colour == o.colour for p in objects) == 1]
            if unique:
                t = rng.choice(unique)
                question, answer = ("what", "shape", "is", t.colour), t.shape
        elif kind == "location":
            unique = [o for o in objects if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objects) == 1]
            if unique:
                t = rng.choice(unique)
                question, answer = ("where", "is", "the", t.colour, t.shape), f"r{t.cell[0]}c{t.cell[1]}"
        elif kind == "count":
            colour = rng.choice(sorted(COLOURS))
            question, answer = ("how", "many", "objects", "are", colour), NUMBERS[sum(o.colour == colour for o in objects)]
        else:
            question, answer = ("what", "colour", "is", "the", "background"), s.background
        if question is not None and question not in asked:
            asked.add(question)
            out.append((kind, question, answer))
    if len(out) < k:
        raise ValueError(f"k: expected at most the distinct questions this image allows, got {k}")
    return out


def _other(rng: random.Random, choices, avoid):
    return rng.choice([c for c in choices if c != avoid])


def encode(words, vocab: tuple[str, ...] = VOCAB) -> list[int]:
    """Token ids of `words` (unknown words: <unk>)."""
    index = {w: i for i, w in enumerate(vocab)}
    return [index.get(w, index["<unk>"]) for w in words]


def batch(samples, num_patches: int, vocab: tuple[str, ...] = VOCAB,
          mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276), question_first: bool = False) -> dict:
    """Model inputs for `samples`: input_ids [B, L] (<bos>, with question_first the question, the
    image tokens, the question; padded on the LEFT to the longest), attention_mask, pixel_values
    [B, 3, H, W] (CLIP-normalised fp32) and answer ids [B]. The image token id is len(vocab)."""
    image_id = len(vocab)
    rows = [[vocab.index("<bos>")] + (encode(s.question, vocab) if question_first else []) + [image_id] * num_patches
            + encode(s.question, vocab) for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    pixels = torch.stack([s.image for s in samples]).float() / 255
    pixels = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    answers = torch.tensor(encode([s.answer for s in samples], vocab))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "answers": answers}
