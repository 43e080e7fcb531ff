"""PNG files without an imaging library: write 8-bit RGB, read 8-bit grey / RGB / RGBA.

`write_png(path, image)` stores a uint8 [3, H, W] (or [H, W, 3]) tensor as an RGB PNG.
`read_png(path)` returns uint8 [3, H, W]. Files are untrusted: the reader checks the signature, every
chunk's length and CRC, the header's size (at most `MAX_PIXELS`) and format before it inflates
anything, inflates at most the bytes the header implies, and accepts 8-bit, non-interlaced grey,
grey + alpha, RGB and RGBA images (alpha is dropped: composited over nothing). Anything else is a
ValueError naming the file and what was expected.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 4096 * 4096
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: Tensor) -> bytes:
    """The bytes of an RGB PNG of `image` (uint8 [3, H, W] or [H, W, 3])."""
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or 3 not in (
            image.shape[0], image.shape[-1]):
        raise ValueError(f"image: expected a uint8 tensor [3, H, W] or [H, W, 3], got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}")
    hwc = image.permute(1, 2, 0) if image.shape[0] == 3 and image.shape[-1] != 3 else image
    hwc = hwc.contiguous().cpu()
    h, w = hwc.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"image: expected at least one pixel, got {tuple(image.shape)}")
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), hwc.reshape(h, w * 3)], 1)  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 6)) + \
        _chunk(b"IEND", b"")


def write_png(path, image: Tensor) -> Path:
    """Write `image` (uint8 [3, H, W] or [H, W, 3]) to `path` as an RGB PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path


def _unfilter(raw: bytes, h: int, stride: int, bpp: int, name: str) -> Tensor:
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
        elif kind != 0:
            raise ValueError(f"{name}: expected PNG row filter 0..4, got {kind} at row {y}")
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return torch.frombuffer(out, dtype=torch.uint8) if out else torch.zeros(0, dtype=torch.uint8)


def decode_png(data: bytes, name: str = "png") -> Tensor:
    """uint8 [3, H, W] from PNG bytes (module docstring: what is accepted)."""
    if not data.startswith(SIGNATURE):
        raise ValueError(f"{name}: expected a PNG file (its signature), got {data[:8]!r}")
    pos, header, idat = len(SIGNATURE), None, []
    while True:
        if pos + 8 > len(data):
            raise ValueError(f"{name}: expected an IEND chunk, the file ends first")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if length > len(data) - pos - 12:
            raise ValueError(f"{name}: chunk {kind!r} claims {length} bytes, more than the file holds")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"{name}: chunk {kind!r} fails its CRC")
        pos += 12 + length
        if kind == b"IHDR":
            if length != 13:
                raise ValueError(f"{name}: expected a 13-byte IHDR, got {length}")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError(f"{name}: expected an IHDR chunk")
    w, h, depth, colour, _, _, interlace = header
    if not (1 <= w and 1 <= h and w * h <= MAX_PIXELS):
        raise ValueError(f"{name}: expected 1 to {MAX_PIXELS} pixels, got {w} x {h}")
    if depth != 8 or colour not in _CHANNELS or interlace != 0:
        raise ValueError(f"{name}: expected an 8-bit non-interlaced grey, grey+alpha, RGB or RGBA PNG, got bit depth "
                         f"{depth}, colour type {colour}, interlace {interlace}")
    channels = _CHANNELS[colour]
    stride = w * channels
    expected = h * (stride + 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(idat), expected)
    except zlib.error as e:
        raise ValueError(f"{name}: corrupt image data ({e})") from None
    if len(raw) != expected:
        raise ValueError(f"{name}: expected {expected} bytes of image data, got {len(raw)}")
    pixels = _unfilter(raw, h, stride, channels, name).view(h, w, channels)
    rgb = pixels[..., :1].expand(h, w, 3) if channels <= 2 else pixels[..., :3]
    return rgb.permute(2, 0, 1).contiguous()


def read_png(path) -> Tensor:
    """uint8 [3, H, W] from a PNG file (module docstring: what is accepted)."""
    path = Path(path)
    return decode_png(path.read_bytes(), str(path))
