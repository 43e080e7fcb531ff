"""PNG files without an imaging library: write 8-bit RGB, read 8-bit grey / RGB / RGBA.

`write_png(path, image)` stores a uint8 [3, H, W] (or [H, W, 3]) tensor as an RGB PNG.
`read_png(path)` returns uint8 [3, H, W]; `png_size(path)` the (height, width) its header gives.

Files are untrusted. The reader reads the signature and the header (the IHDR chunk, which must come
first, CRC-checked) before anything else, and refuses there what is not a PNG, what is not an 8-bit,
non-interlaced grey, grey + alpha, RGB or RGBA image, and what is larger than `MAX_SIDE` pixels a
side or `MAX_PIXELS` in all. Only then does it read the rest of the file, at most `max_file_bytes`
(twice the image's filtered rows plus 16 MiB: a deflate stream is at most about 1.001 times what it
holds, the rest is room for metadata chunks; a longer file is refused before its body is read). It
checks every chunk's length and CRC (at most `MAX_CHUNKS` chunks), inflates at most the bytes the
header implies and undoes the row filters with numpy (about half a second for a 4096 x 4096 RGBA
image filtered with Paeth, on one CPU core; the inflating is a third of it). Alpha is dropped
(composited over nothing). Anything else is a ValueError naming the file and what was expected.

Memory: decoding holds the file, the inflated rows and two work copies of the pixels (4 bytes
each, rows filtered with Average or Paeth only) besides the result: about 12 bytes a pixel at the
peak (measured: 195 MiB for a 4096 x 4096 RGBA file, its 48 MiB result included).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided
from torch import Tensor

from .untrusted import open_binary

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 4096 * 4096
MAX_SIDE = 16384
MAX_CHUNKS = 1 << 20  # after IHDR (about a second to walk at most)
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel
_HEAD = len(SIGNATURE) + 25  # the signature and the IHDR chunk (length, type, 13 bytes, CRC)


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


def max_file_bytes(height: int, width: int, channels: int) -> int:
    """The largest PNG file read for an image of this size: twice its filtered rows plus 16 MiB."""
    return 2 * height * (width * channels + 1) + (16 << 20)


def _header(head: bytes, name: str) -> tuple[int, int, int]:
    """(height, width, samples per pixel) from a file's first bytes (the signature and the IHDR
    chunk), checked: the CRC, the size limits and the format."""
    if not head.startswith(SIGNATURE):
        raise ValueError(f"{name}: expected a PNG file (its signature), got {head[:8]!r}")
    if len(head) < _HEAD:
        raise ValueError(f"{name}: expected an IHDR chunk, the file ends first")
    length, kind = struct.unpack(">I4s", head[8:16])
    if kind != b"IHDR":
        raise ValueError(f"{name}: expected the IHDR chunk first, got {kind!r}")
    if length != 13:
        raise ValueError(f"{name}: expected a 13-byte IHDR, got {length}")
    if zlib.crc32(head[12:29]) & 0xFFFFFFFF != struct.unpack(">I", head[29:33])[0]:
        raise ValueError(f"{name}: chunk {kind!r} fails its CRC")
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE and w * h <= MAX_PIXELS):
        raise ValueError(f"{name}: expected 1 to {MAX_PIXELS} pixels and at most {MAX_SIDE} a side, got {w} x {h}")
    if depth != 8 or colour not in _CHANNELS or interlace != 0:
        raise ValueError(f"{name}: expected an 8-bit non-interlaced grey, grey+alpha, RGB or RGBA PNG, got bit depth "
                         f"{depth}, colour type {colour}, interlace {interlace}")
    return h, w, _CHANNELS[colour]


def _check_length(size: int, h: int, w: int, channels: int, name: str) -> None:
    limit = max_file_bytes(h, w, channels)
    if size > limit:
        raise ValueError(f"{name}: expected at most {limit} bytes for a {w} x {h} image (twice its filtered rows "
                         f"plus 16 MiB), the file holds more")


_BAND = 16  # pixels per row that _wavefront moves between the rows and its diagonals at once
_LANE_TYPE = {1: np.int16, 2: np.int32, 4: np.int64}  # int16 lanes of one pixel as one element


def _wavefront(data: np.ndarray, kinds: np.ndarray, prev: np.ndarray, out: np.ndarray) -> None:
    """Undo the filters of R rows holding Average (3) or Paeth (4) ones, any filter per row:
    data uint8 [R, W * C] (filtered), kinds [R], prev uint8 [W, C] (the row above, undone), out
    uint8 [R, W + 2 * _BAND, lanes] (row y's pixel x lands at out[y, _BAND + x, :C]; lanes = C, or 4
    for C = 3; the rest is scratch).

    Byte (y, x) needs (y, x - 1), (y - 1, x) and (y - 1, x - 1), so the anti-diagonal x + y = s needs
    only the two before it: the R rows take W + R - 1 steps, each a vector op over the rows on one
    diagonal (the diagonals are stored as int16 vectors indexed by row, so every neighbour is a
    plain slice, and three of them are live at a time). Pixels move between the rows and the
    diagonals _BAND at a time, one strided copy per band each way."""
    r, width, c = out.shape[0], out.shape[1] - 2 * _BAND, prev.shape[1]
    lanes, band = out.shape[2], _BAND
    pad = np.zeros((r, width + 2 * band, lanes), np.uint8)  # the filtered rows, padded like out
    pad[:, band:band + width, :c] = data.reshape(r, width, c)
    n = (r + 1) * lanes  # a diagonal: row 0 is prev, row i the i-th of data
    diagonals = [np.zeros(n, np.int16) for _ in range(3)]
    scratch = [np.empty(n, np.int16) for _ in range(6)]
    band_in, band_out = np.empty((r, band * lanes), np.int16), np.empty((r, band * lanes), np.int16)
    lane = _LANE_TYPE[lanes]
    pixel_in, pixel_out = band_in.view(lane), band_out.view(lane)  # [r, band]: one pixel an element
    pixels = [d.view(lane) for d in diagonals]
    above = np.zeros((width, lanes), np.int16)
    above[:, :c] = prev
    above_px = above.view(lane).reshape(-1)
    pixels[1][0] = above_px[0]  # diagonal 1: prev's first pixel
    masks = {k: np.repeat(-np.concatenate([[False], kinds == k]).astype(np.int16), lanes)
             for k in (1, 2, 3, 4) if (kinds == k).any()}  # -1 on the rows filtered with k
    present = np.unique(kinds)
    only = int(present[0]) if present.size == 1 else None  # 3 or 4: every row filtered alike
    step = pad.strides[0] - pad.strides[1]  # one row down, one pixel left
    last = width + r
    for u0 in range(2, last + 1, band):
        u1 = min(last, u0 + band - 1)
        top, bottom = max(1, u0 - width), min(r, u1 - 1)  # the rows on some diagonal of this band
        rows, x0 = bottom - top + 1, u0 - 1 - top + band
        band_in[:rows] = as_strided(pad[top - 1, x0:], shape=(rows, band * lanes), strides=(step, 1))
        for u in range(u0, u1 + 1):  # diagonal u: row i's pixel x = u - 1 - i
            lo, hi = max(1, u - width), min(r, u - 1)
            e0, e1, m = lo * lanes, (hi + 1) * lanes, (hi - lo + 1) * lanes
            cur, left, up_left = diagonals[u % 3], diagonals[(u - 1) % 3], diagonals[(u - 2) % 3]
            if u - 1 < width:
                pixels[u % 3][0] = above_px[u - 1]
            pixels[u % 3][lo:hi + 1] = pixel_in[lo - top:hi - top + 1, u - u0]
            x, a, b, c_ = cur[e0:e1], left[e0:e1], left[e0 - lanes:e1 - lanes], up_left[e0 - lanes:e1 - lanes]
            da, db, pa, pb, pc, pred = (v[:m] for v in scratch)
            if only == 3:
                np.add(a, b, out=pred)
                pred >>= 1
            elif only in (None, 4):  # Paeth: a, b or c, whichever is nearest p = a + b - c
                np.subtract(a, c_, out=da)  # p - b
                np.subtract(b, c_, out=db)  # p - a
                np.abs(db, out=pa)
                np.abs(da, out=pb)
                np.add(da, db, out=pc)
                np.abs(pc, out=pc)
                np.subtract(pb, pc, out=pred)
                pred -= 1
                pred >>= 15  # -1 where pb <= pc
                np.bitwise_and(db, pred, out=db)  # b - c where b is nearer than c, else 0
                np.minimum(pb, pc, out=pb)
                np.subtract(pa, pb, out=pred)
                pred -= 1
                pred >>= 15  # -1 where pa <= min(pb, pc)
                np.bitwise_xor(db, da, out=da)
                np.bitwise_and(da, pred, out=da)
                np.bitwise_xor(db, da, out=pred)  # (a, b or c) - c
                pred += c_
                if only is None:  # each row its own filter: each predictor masked to its rows
                    if 4 in masks:
                        pred &= masks[4][e0:e1]
                    else:
                        pred.fill(0)
                    for k in (3, 2, 1):  # Average, Up, Sub (None: 0)
                        if k in masks:
                            if k == 3:
                                np.add(a, b, out=pa)
                                pa >>= 1
                            else:
                                np.copyto(pa, b if k == 2 else a)
                            pa &= masks[k][e0:e1]
                            pred |= pa
            x += pred
            x &= 0xFF
            pixel_out[lo - top:hi - top + 1, u - u0] = pixels[u % 3][lo:hi + 1]
        done = (u1 - u0 + 1) * lanes
        as_strided(out[top - 1, x0:], shape=(rows, done), strides=(step, 1))[:] = band_out[:rows, :done]


def _simple_row(kind: int, line: np.ndarray, prev: np.ndarray, out: np.ndarray) -> None:
    """Undo a None (0), Sub (1: a running sum mod 256 along the row) or Up (2) row: line, prev (the
    row above, undone) and out uint8 [W, C]."""
    if kind == 0:
        out[:] = line
    elif kind == 1:
        np.cumsum(line, axis=0, dtype=np.uint8, out=out)
    else:
        np.add(line, prev, out=out)


def _unfilter(raw: bytes, h: int, w: int, channels: int, name: str) -> np.ndarray:
    """uint8 [H, W, C] (a view) from the inflated rows (each a filter byte, then W * C filtered
    bytes). None, Sub (a running sum mod 256) and Up rows before the first and after the last
    Average / Paeth row are undone a row at a time, the rows between by _wavefront."""
    rows = np.frombuffer(raw, np.uint8).reshape(h, w * channels + 1)
    kinds = rows[:, 0]
    bad = np.flatnonzero(kinds > 4)
    if bad.size:
        raise ValueError(f"{name}: expected PNG row filter 0..4, got {kinds[bad[0]]} at row {bad[0]}")
    data = rows[:, 1:]
    slow = np.flatnonzero(kinds >= 3)
    first, end = (int(slow[0]), int(slow[-1]) + 1) if slow.size else (h, h)
    lanes = 4 if channels == 3 and slow.size else channels
    padded = np.empty((h, w + 2 * _BAND, lanes), np.uint8) if slow.size else np.empty((h, w, channels), np.uint8)
    out = padded[:, _BAND:_BAND + w, :channels] if slow.size else padded
    zero = np.zeros((w, channels), np.uint8)
    for y in range(first):
        _simple_row(kinds[y], data[y].reshape(w, channels), out[y - 1] if y else zero, out[y])
    if slow.size:
        _wavefront(data[first:end], kinds[first:end], out[first - 1] if first else zero, padded[first:end])
    for y in range(end, h):
        _simple_row(kinds[y], data[y].reshape(w, channels), out[y - 1], out[y])
    return out


def _decode(data: bytes, h: int, w: int, channels: int, name: str) -> Tensor:
    """decode_png after the header (the first _HEAD bytes of data) was read and checked."""
    _check_length(len(data), h, w, channels, name)
    view, pos, idat = memoryview(data), _HEAD, []
    for count in range(MAX_CHUNKS + 1):
        if count == MAX_CHUNKS:
            raise ValueError(f"{name}: expected at most {MAX_CHUNKS} chunks")
        if pos + 8 > len(data):
            raise ValueError(f"{name}: expected an IEND chunk, the file ends first")
        length, kind = struct.unpack(">I4s", view[pos:pos + 8])
        if length > len(data) - pos - 12:
            raise ValueError(f"{name}: chunk {kind!r} claims {length} bytes, more than the file holds")
        body = view[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", view[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            raise ValueError(f"{name}: chunk {kind!r} fails its CRC")
        pos += 12 + length
        if kind == b"IHDR":
            raise ValueError(f"{name}: expected one IHDR chunk, got a second")
        if kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    compressed = b"".join(idat)
    del idat, body, view, data  # the file (when the caller holds no other reference) and its chunks
    expected = h * (w * channels + 1)
    try:
        raw = zlib.decompressobj().decompress(compressed, expected)
    except zlib.error as e:
        raise ValueError(f"{name}: corrupt image data ({e})") from None
    del compressed
    if len(raw) != expected:
        raise ValueError(f"{name}: expected {expected} bytes of image data, got {len(raw)}")
    pixels = torch.from_numpy(_unfilter(raw, h, w, channels, name))
    rgb = pixels[..., :1].expand(h, w, 3) if channels <= 2 else pixels[..., :3]
    return rgb.permute(2, 0, 1).contiguous()


def decode_png(data: bytes, name: str = "png") -> Tensor:
    """uint8 [3, H, W] from PNG bytes (module docstring: what is accepted)."""
    return _decode(data, *_header(data[:_HEAD], name), name)


def png_size(path) -> tuple[int, int]:
    """(height, width) of a PNG file, from its header, checked as read_png checks it before reading
    the rest (the signature, the IHDR chunk, the size limits, the format and the file's length)."""
    path = Path(path)
    with open_binary(path) as f:
        h, w, channels = _header(f.read(_HEAD), str(path))
        _check_length(f.seek(0, 2), h, w, channels, str(path))
    return h, w


def read_png(path) -> Tensor:
    """uint8 [3, H, W] from a PNG file (module docstring: what is accepted)."""
    path = Path(path)
    with open_binary(path) as f:
        head = f.read(_HEAD)
        h, w, channels = _header(head, str(path))
        limit = max_file_bytes(h, w, channels) + 1  # one byte more than is accepted: a longer file is refused
        if f.seekable():  # its length checked before the body is read; the file in one buffer, which
            _check_length(f.seek(0, 2), h, w, channels, str(path))  # _decode frees once it has the image data
            f.seek(0)
            return _decode(f.read(limit), h, w, channels, str(path))
        return _decode(head + f.read(limit - len(head)), h, w, channels, str(path))
