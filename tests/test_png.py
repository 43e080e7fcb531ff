"""swiftvlm_kernels.apps.png: the writer round-trips through the reader; the reader undoes every PNG row
filter (bit-exact against the former pure-Python row unfilter, kept here as the reference), reads
grey / grey+alpha / RGB / RGBA, and refuses malformed or oversized files before it inflates them."""
import struct
import zlib

import numpy as np
import pytest
import torch

from swiftvlm_kernels.apps import png
from swiftvlm_kernels.apps.png import SIGNATURE, decode_png, encode_png, read_png, write_png


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(pixels, colour_type, filters, depth=8, interlace=0, width=None, height=None):
    """A PNG of uint8 [H, W, C] pixels, row y filtered with filters[y % len(filters)] (a reference
    filter encoder, written from the PNG specification)."""
    h, w, c = pixels.shape
    rows, prev = [], [0] * (w * c)
    for y in range(h):
        line = pixels[y].reshape(-1).tolist()
        f = filters[y % len(filters)]
        enc = []
        for i, x in enumerate(line):
            a = line[i - c] if i >= c else 0
            b, cc = prev[i], prev[i - c] if i >= c else 0
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else cc
            enc.append((x - pred) % 256)
        rows.append(bytes([f] + enc))
        prev = line
    header = struct.pack(">IIBBBBB", width or w, height or h, depth, colour_type, 0, 0, interlace)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")


def test_write_then_read_round_trips(tmp_path):
    img = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = write_png(tmp_path / "sub" / "a.png", img)
    assert torch.equal(read_png(path), img)
    assert torch.equal(decode_png(encode_png(img.permute(1, 2, 0))), img)  # [H, W, 3] accepted too


@pytest.mark.parametrize("colour_type, channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_every_filter_and_colour_type(colour_type, channels):
    px = torch.randint(0, 256, (9, 7, channels), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = decode_png(_png(px, colour_type, (0, 1, 2, 3, 4)))
    want = px[..., :1].expand(9, 7, 3) if channels <= 2 else px[..., :3]
    assert torch.equal(out, want.permute(2, 0, 1))


@pytest.mark.parametrize("mutate, words", [
    (lambda b: b"GIF89a" + b[6:], "expected a PNG file"),
    (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "fails its CRC"),
    (lambda b: b[:-12], "expected an IEND chunk"),
])
def test_malformed_files_are_refused(mutate, words):
    good = _png(torch.zeros(2, 2, 3, dtype=torch.uint8), 2, (0,))
    with pytest.raises(ValueError, match=words):
        decode_png(mutate(good))


@pytest.mark.parametrize("kwargs, words", [
    (dict(width=100_000, height=100_000), "expected 1 to"),  # refused before anything is inflated
    (dict(depth=16), "expected an 8-bit non-interlaced"),
    (dict(interlace=1), "expected an 8-bit non-interlaced"),
    (dict(height=5), "expected 35 bytes of image data, got 14"),  # the header claims more rows than stored
])
def test_headers_outside_what_is_read_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        decode_png(_png(torch.zeros(2, 2, 3, dtype=torch.uint8), 2, (0,), **kwargs))


def test_bad_image_argument():
    with pytest.raises(ValueError, match=r"image: expected a uint8 tensor \[3, H, W\]"):
        encode_png(torch.zeros(3, 4, 4))


def _reference_unfilter(raw: bytes, h: int, stride: int, bpp: int) -> bytes:
    """The reader's former row unfilter (pure Python, a byte at a time), the reference."""
    out = bytearray(h * stride)
    prev = bytearray(stride)
    pos = 0
    for y in range(h):
        kind = raw[pos]
        line = bytearray(raw[pos + 1:pos + 1 + stride])
        pos += 1 + stride
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return bytes(out)


# filters per row: every type at random, one type throughout, Average / Paeth only between simple
# rows, simple rows only, and Paeth rows each alone between None rows
_PATTERNS = {"random": lambda rng, h: rng.integers(0, 5, h), "paeth": lambda rng, h: np.full(h, 4),
             "average": lambda rng, h: np.full(h, 3), "sub": lambda rng, h: np.full(h, 1),
             "middle": lambda rng, h: np.where((np.arange(h) > h // 4) & (np.arange(h) < 3 * h // 4),
                                               rng.integers(3, 5, h), rng.integers(0, 3, h)),
             "simple": lambda rng, h: rng.integers(0, 3, h), "alternating": lambda rng, h: np.arange(h) % 2 * 4}


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("pattern", sorted(_PATTERNS))
def test_unfilter_is_bit_exact_against_the_reference(channels, pattern):
    """Random filtered bytes and filter types, grey / grey+alpha / RGB / RGBA, sizes below, at and
    above the wavefront's band of 16 pixels, odd sizes, single rows and columns."""
    rng = np.random.default_rng(channels * 100 + sorted(_PATTERNS).index(pattern))
    for h, w in [(1, 1), (1, 37), (37, 1), (2, 2), (16, 16), (17, 15), (15, 17), (33, 40), (3, 50), (50, 3)]:
        kinds = _PATTERNS[pattern](rng, h).astype(np.uint8)
        rows = np.concatenate([kinds[:, None], rng.integers(0, 256, (h, w * channels), dtype=np.uint8)], 1)
        raw = rows.tobytes()
        got = np.ascontiguousarray(png._unfilter(raw, h, w, channels, "t"))
        want = _reference_unfilter(raw, h, w * channels, channels)
        assert got.shape == (h, w, channels) and got.tobytes() == want, (h, w, kinds.tolist())
        colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
        header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
        image = decode_png(SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) +
                           _chunk(b"IEND", b""))
        pixels = torch.from_numpy(np.frombuffer(want, np.uint8).reshape(h, w, channels).copy())
        assert torch.equal(image, (pixels[..., :1].expand(h, w, 3) if channels <= 2 else pixels[..., :3])
                           .permute(2, 0, 1))


def test_an_unknown_row_filter_is_refused_naming_the_row():
    raw = bytes([0, 1, 2, 3]) + bytes([5, 1, 2, 3])
    with pytest.raises(ValueError, match="t: expected PNG row filter 0..4, got 5 at row 1"):
        png._unfilter(raw, 2, 1, 3, "t")
