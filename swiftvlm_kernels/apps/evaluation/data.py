"""The evaluation's questions: the synthetic held-out set and dataset folders (questions.jsonl and
its images, validated: see the package docstring), the images of a dataset read when a batch needs
them (one at a time; the last CACHED_IMAGES resized ones kept), and the patches a question's boxes
cover."""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .. import synth
from ..png import MAX_PIXELS, MAX_SIDE, png_size, read_png
from ..untrusted import check_text, json_value, jsonl_lines

MAX_LINES = 100_000
MAX_QUESTION_CHARS = 16_384  # a question (the model's context bounds its prompt too: prompts.prompt_ids)
MAX_QUESTION_WORDS = 4_096
MAX_ANSWER_CHARS = 1_024
MAX_KIND_CHARS = 64
CACHED_IMAGES = 64  # resized images a dataset keeps, the most recently used
IMAGE_PLACEHOLDER = "<image>"  # where a prompt template puts the image: never inside a question
OVERALL = "all"  # the overall accuracy's name in the reports; a question without a kind has it


class ImageFile:
    """A dataset's image, read when a batch needs it: its path, shape (3, H, W) from its header,
    where it was named (for messages), and the dataset's cache of resized images."""

    def __init__(self, path: Path, shape: tuple[int, int, int], source: str, cache: "OrderedDict"):
        self.path, self.shape, self.source, self._cache = path, shape, source, cache

    def load(self) -> Tensor:
        """uint8 [3, H, W], read now (not kept)."""
        try:
            image = _read_image(self.path)
        except ValueError as e:
            raise ValueError(f"{self.source}: image: {e}") from None
        if tuple(image.shape) != self.shape:  # the file changed since its header was read
            raise ValueError(f"{self.source}: image: {self.path} is {tuple(image.shape)} now, {self.shape} when the "
                             "dataset was read")
        return image

    def resized(self, size: int) -> Tensor:
        """fp32 [3, size, size] in [0, 1] (see `resize`), from the cache when it holds it."""
        key = (self.path, size)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image = resize(self.load(), size)
        self._cache[key] = image
        if len(self._cache) > CACHED_IMAGES:
            self._cache.popitem(last=False)
        return image


@dataclass
class Item:
    """One question: image uint8 [3, H, W] (an ImageFile for a dataset's, read when needed), the
    question text, the answer, its kind, the pixel boxes the answer depends on (may be empty) and
    where it was read (file and line, for messages; empty for synthetic items)."""
    image: Union[Tensor, ImageFile]
    question: str
    answer: str
    kind: str = OVERALL
    boxes: tuple = ()
    source: str = ""


def resize(image: Union[Tensor, ImageFile], size: int) -> Tensor:
    """fp32 [3, size, size] in [0, 1]: a uint8 [3, H, W] image resized (bilinear, antialiased), an
    ImageFile through its dataset's cache. It holds a float copy of the image (12 bytes a pixel; the
    image itself is freed when the caller holds no other reference) and the resize's intermediate (at
    most 12 * size * max(H, W) bytes): under 256 MiB at png.MAX_PIXELS and MAX_SIDE for size <= 336."""
    if isinstance(image, ImageFile):
        return image.resized(size)
    x = image.float().div_(255)[None]
    del image  # freed here when the caller passed a temporary (ImageFile.resized)
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(0, 1)
    return x[0]


def synthetic_item(s: synth.Sample, cell: int = synth.CELL) -> Item:
    """A synthetic sample as an item: its question's words joined, the boxes of the cells it names."""
    boxes = tuple((c * cell, r * cell, (c + 1) * cell, (r + 1) * cell) for r, c in s.cells_in_question())
    return Item(s.image, " ".join(s.question), s.answer, s.kind, boxes)


def synthetic_items(n: int, seed: int = 1, grid: int = synth.GRID, cell: int = synth.CELL) -> list[Item]:
    """The first n samples of the synthetic split `seed` (1: the held-out split) as items."""
    return [synthetic_item(synth.sample(seed, i, grid=grid, cell=cell), cell) for i in range(n)]


def json_object(text: str, name: str, line: int) -> Optional[dict]:
    """One line of a JSON-lines file (`name`, for the message): the object it holds, None for a blank
    line; ValueError naming the file and line for anything but a JSON object (malformed JSON, an
    integer too long to convert, nesting too deep for the parser)."""
    if not text.strip():
        return None
    entry = json_value(text, f"{name} line {line}", "a JSON object")
    if not isinstance(entry, dict):
        raise ValueError(f"{name} line {line}: expected a JSON object, got {type(entry).__name__}")
    return entry


def _field(entry: dict, name: str, kind, where: str, required: bool = True):
    value = entry.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: {name}: expected {kind.__name__}, got {value!r:.80}")
    return check_text(value, f"{where}: {name}") if isinstance(value, str) else value


def _text_field(entry: dict, name: str, where: str, limit: int, required: bool = True) -> str:
    """A string field of at most `limit` characters ("" when it is optional and absent)."""
    value = _field(entry, name, str, where, required)
    if value is not None and len(value) > limit:
        raise ValueError(f"{where}: {name}: expected at most {limit} characters, got {len(value)}")
    return value or ""


def _question(entry: dict, where: str) -> str:
    question = _text_field(entry, "question", where, MAX_QUESTION_CHARS)
    words = len(question.split())
    if words > MAX_QUESTION_WORDS:
        raise ValueError(f"{where}: question: expected at most {MAX_QUESTION_WORDS} words, got {words}")
    if IMAGE_PLACEHOLDER in question:
        raise ValueError(f"{where}: question: expected no {IMAGE_PLACEHOLDER} (the prompt's image placeholder: "
                         "the image comes once, from the image field)")
    return question


def _kind(entry: dict, where: str) -> str:
    kind = _text_field(entry, "kind", where, MAX_KIND_CHARS, required=False)
    if not kind:
        return OVERALL
    if kind == OVERALL:
        raise ValueError(f"{where}: kind: {OVERALL!r} is the overall accuracy's name in the reports; expected "
                         "another kind, or none")
    if not kind.isprintable() or "|" in kind:
        raise ValueError(f"{where}: kind: expected printable characters other than '|' (a table column), got "
                         f"{kind!r:.80}")
    return kind


def _boxes(entry: dict, where: str, height: int, width: int) -> tuple:
    boxes = []
    for j, b in enumerate(_field(entry, "boxes", list, where, required=False) or []):
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            and v >= 0 for v in b) and b[0] < b[2] and b[1] < b[3]):
            raise ValueError(f"{where}: boxes: expected [x0, y0, x1, y1] pixel boxes with x0 < x1, y0 < y1, got "
                             f"{b!r:.80}")
        if b[2] > width or b[3] > height:
            raise ValueError(f"{where}: boxes[{j}]: expected a box inside the {width} x {height} image "
                             f"(x1 <= {width}, y1 <= {height}), got {b!r:.80}")
        boxes.append(tuple(b))
    return tuple(boxes)


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image's header (PNG; other formats through Pillow)."""
    if path.suffix.lower() == ".png":
        return png_size(path)
    try:
        from PIL import Image  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(f"{path}: only PNG images are read without Pillow (pip install pillow)") from None
    with Image.open(path) as im:
        w, h = im.size
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE and w * h <= MAX_PIXELS):
        raise ValueError(f"{path}: expected 1 to {MAX_PIXELS} pixels and at most {MAX_SIDE} a side, got {w} x {h}")
    return h, w


def _read_image(path: Path) -> Tensor:
    if path.suffix.lower() == ".png":
        return read_png(path)
    _image_size(path)
    from PIL import Image  # type: ignore[import-not-found]

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def _image(root: Path, name: str, where: str, seen: dict, cache: "OrderedDict") -> ImageFile:
    """The ImageFile of `name` (a file inside root), its header read and checked once per file."""
    if len(name) > 4096:
        raise ValueError(f"{where}: image: expected a path of at most 4096 characters, got {len(name)}")
    try:
        path = (root / name).resolve()
        inside = path.is_relative_to(root.resolve()) and path.is_file()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise ValueError(f"{where}: image: expected a file inside {root}, got {name!r} ({e})") from None
    if not inside:
        raise ValueError(f"{where}: image: expected a file inside {root}, got {name!r}")
    if path not in seen:
        try:
            seen[path] = ImageFile(path, (3, *_image_size(path)), where, cache)
        except ValueError as e:
            raise ValueError(f"{where}: image: {e}") from None
    return seen[path]


def dataset_items(root, limit: Optional[int] = None) -> list[Item]:
    """The items of a dataset folder (see the package docstring), validated; the images' headers are
    read here, their pixels when a batch needs them (`Item.image` is an ImageFile).

    Raises
    ------
    ValueError
        a missing questions.jsonl, a malformed line (naming the file, line and field), an image path
        outside the folder, an unreadable image header, a box outside its image, or no questions.
    """
    root = Path(root)
    listing = root / "questions.jsonl"
    if not listing.is_file():
        raise ValueError(f"--data: expected a folder holding questions.jsonl, got {root}")
    items: list[Item] = []
    seen: dict = {}
    cache: OrderedDict = OrderedDict()
    for line, text in jsonl_lines(listing, MAX_LINES):
        if limit is not None and len(items) >= limit:
            break
        where = f"{listing} line {line}"
        entry = json_object(text, str(listing), line)
        if entry is None:
            continue
        image = _image(root, _field(entry, "image", str, where), where, seen, cache)
        question = _question(entry, where)
        answer = _text_field(entry, "answer", where, MAX_ANSWER_CHARS)
        items.append(Item(image, question, answer, _kind(entry, where), _boxes(entry, where, *image.shape[1:]),
                          where))
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
