"""The evaluation's questions: the synthetic held-out set and dataset folders (questions.jsonl and
its images, validated: see the package docstring), and the patches a question's boxes cover."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import synth
from ..png import read_png

MAX_LINES = 100_000


@dataclass
class Item:
    """One question: image uint8 [3, H, W], the question text, the answer, its kind, and the pixel
    boxes the answer depends on (may be empty)."""
    image: Tensor
    question: str
    answer: str
    kind: str = "all"
    boxes: tuple = ()


def synthetic_item(s: synth.Sample, cell: int = synth.CELL) -> Item:
    """A synthetic sample as an item: its question's words joined, the boxes of the cells it names."""
    boxes = tuple((c * cell, r * cell, (c + 1) * cell, (r + 1) * cell) for r, c in s.cells_in_question())
    return Item(s.image, " ".join(s.question), s.answer, s.kind, boxes)


def synthetic_items(n: int, seed: int = 1, grid: int = synth.GRID, cell: int = synth.CELL) -> list[Item]:
    """The first n samples of the synthetic split `seed` (1: the held-out split) as items."""
    return [synthetic_item(synth.sample(seed, i, grid=grid, cell=cell), cell) for i in range(n)]


def json_object(text: str, name: str, line: int) -> Optional[dict]:
    """One line of a JSON-lines file (`name`, for the message): the object it holds, None for a blank
    line; ValueError naming the file and line for anything but a JSON object."""
    if not text.strip():
        return None
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} line {line}: expected a JSON object ({e.msg})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{name} line {line}: expected a JSON object, got {type(entry).__name__}")
    return entry


def _field(entry: dict, name: str, kind, line: int, required: bool = True):
    value = entry.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"questions.jsonl line {line}: {name}: expected {kind.__name__}, got {value!r:.80}")
    return value


def _read_image(path: Path) -> Tensor:
    if path.suffix.lower() == ".png":
        return read_png(path)
    try:
        from PIL import Image  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(f"{path}: only PNG images are read without Pillow (pip install pillow)") from None
    with Image.open(path) as im:
        if im.width * im.height > 4096 * 4096:
            raise ValueError(f"{path}: expected at most 4096 x 4096 pixels, got {im.width} x {im.height}")
        rgb = im.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def dataset_items(root, limit: Optional[int] = None) -> list[Item]:
    """The items of a dataset folder (see the package docstring), validated.

    Raises
    ------
    ValueError
        a missing questions.jsonl, a malformed line (naming line and field), an image path outside
        the folder, an unreadable image, or no questions.
    """
    root = Path(root)
    listing = root / "questions.jsonl"
    if not listing.is_file():
        raise ValueError(f"--data: expected a folder holding questions.jsonl, got {root}")
    items: list[Item] = []
    with listing.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if line > MAX_LINES:
                raise ValueError(f"questions.jsonl: expected at most {MAX_LINES} lines")
            entry = json_object(text, listing.name, line)
            if entry is None:
                continue
            name = _field(entry, "image", str, line)
            path = (root / name).resolve()
            if not path.is_relative_to(root.resolve()) or not path.is_file():
                raise ValueError(f"questions.jsonl line {line}: image: expected a file inside {root}, got {name!r}")
            question = _field(entry, "question", str, line)
            answer = _field(entry, "answer", str, line)
            kind = _field(entry, "kind", str, line, required=False) or "all"
            raw_boxes = _field(entry, "boxes", list, line, required=False) or []
            boxes = []
            for b in raw_boxes:
                if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                    and v >= 0 for v in b) and b[0] < b[2] and b[1] < b[3]):
                    raise ValueError(f"questions.jsonl line {line}: boxes: expected [x0, y0, x1, y1] pixel boxes "
                                     f"with x0 < x1, y0 < y1, got {b!r:.80}")
                boxes.append(tuple(b))
            items.append(Item(_read_image(path), question, answer, kind, tuple(boxes)))
    if not items:
        raise ValueError(f"--data: {listing} holds no questions")
    return items


def target_patches(item: Item, image_size: tuple[int, int], grid: int) -> Tensor:
    """Indices (row-major, of a grid x grid patch grid) of the patches that overlap the item's boxes."""
    H, W = image_size
    on = torch.zeros(grid, grid, dtype=torch.bool)
    for x0, y0, x1, y1 in item.boxes:
        r0, r1 = int(y0 * grid // H), int(math.ceil(min(y1, H) * grid / H))
        c0, c1 = int(x0 * grid // W), int(math.ceil(min(x1, W) * grid / W))
        on[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = True
    return on.flatten().nonzero().flatten()
