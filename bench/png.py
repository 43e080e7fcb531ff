"""PNG decoding time (the evaluation reads untrusted PNG datasets with the package's own reader, no
imaging library): a Paeth-filtered 4096 x 4096 RGBA file (about 74 KB, every byte 0), the same
size with random pixels under Paeth, Average and Sub filters, and a 1024 x 1024 RGB photo-like one.

    python -m bench.png [--rounds 5]

Prints min and median seconds per decode (bench/timer.py: the cases interleaved in rounds, one thread).
"""
from __future__ import annotations

import argparse
import struct
import zlib

import torch

from bench.timer import environment, measure
from swiftvlm_kernels.apps.png import SIGNATURE, decode_png


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(w: int, h: int, channels: int, filter_type: int, random: bool, seed: int = 0) -> bytes:
    """A w x h PNG (RGB or RGBA) whose every row carries filter_type; random or all-zero filtered bytes
    (any filtered bytes decode to some image: the work of undoing the filter is the same)."""
    colour = {3: 2, 4: 6}[channels]
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(0, 256, (h, w * channels), dtype=torch.uint8, generator=g) if random else \
        torch.zeros(h, w * channels, dtype=torch.uint8)
    rows = torch.cat([torch.full((h, 1), filter_type, dtype=torch.uint8), body], 1)
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 6)) + \
        _chunk(b"IEND", b"")


CASES = {
    "4096x4096 RGBA Paeth, zero (74 KB)": (4096, 4096, 4, 4, False),
    "4096x4096 RGBA Paeth, random": (4096, 4096, 4, 4, True),
    "4096x4096 RGB Average, random": (4096, 4096, 3, 3, True),
    "4096x4096 RGB Sub, random": (4096, 4096, 3, 1, True),
    "1024x1024 RGB Paeth, random": (1024, 1024, 3, 4, True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.png", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    blobs = {name: png_bytes(*spec) for name, spec in CASES.items()}
    timings = measure({name: (lambda b=blob: decode_png(b)) for name, blob in blobs.items()}, rounds=args.rounds,
                      sample_s=0)
    env = environment()
    print(f"PNG decode on {env['device_name']} ({env['cpus']} CPUs, {env['threads']} thread), torch {env['torch']}, "
          f"commit {env['commit']}")
    for name, t in timings.items():
        print(f"  {name:38s} {len(blobs[name]) / 1024:9.0f} KB  min {t.min:.3f} s  median {t.median:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
