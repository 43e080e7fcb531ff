"""The traffic build of the CUDA emulation (bench.static_report's counted CUDA bytes): every global load
and store of a launch is counted; the kernel's parameters, its locals and shared memory are not.

The traffic build registers the same ops as the test build of the emulation, so it runs in a child
process (this file, run as a script)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


def _child():
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cuda_emulator as ce

    lib = ce.build(traffic=True)
    backend = ce.backend(lib)
    B, R, Z, d = 2, 100, 5, 64
    h_rest, now, then = torch.randn(B, R, d), torch.randn(B, Z, d), torch.randn(B, Z, d)
    group = torch.randint(0, Z, (B, R))
    out = []
    bypass = ce.count_traffic(lib, lambda: out.append(backend.bypass_align(h_rest, group, now, then)))
    tensors = (h_rest, group, now, then, out[0])
    q, k = torch.randn(1, 32, 128).bfloat16(), torch.randn(1, 32, 300, 128).bfloat16()
    score = ce.count_traffic(lib, lambda: backend.score_select(q, k, torch.tensor([20]), 256, 85, 128 ** -0.5, None))
    print(json.dumps(dict(bypass=bypass, bypass_min=sum(t.numel() * t.element_size() for t in tensors),
                          bypass_out=out[0].numel() * 4, bypass_in=h_rest.numel() * 4 + group.numel() * 8,
                          score=score, keys=k.numel() * 2, tensors=len(tensors))))


@pytest.fixture(scope="module")
def counted():
    run = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_bypass_align_moves_its_minimum(counted):
    """bypass_align reads h_rest, group and the merged rows and writes its output: the distinct sectors
    it touches are those tensors' bytes (within a sector at each tensor's ends), and it reads every
    h_rest byte and writes every output byte once."""
    (la,) = counted["bypass"]
    minimum = counted["bypass_min"]
    assert minimum <= la["sector_bytes"] <= minimum + 2 * 32 * counted["tensors"]
    assert la["write_bytes"] == counted["bypass_out"]
    assert la["read_bytes"] >= counted["bypass_in"]


def test_score_select_reads_the_keys_once(counted):
    """LLaVA-1.5-like keys (bf16, 32 heads, D = 128): the distinct sectors stay within 5% of the keys."""
    sectors = sum(la["sector_bytes"] for la in counted["score"])
    assert counted["keys"] <= sectors <= 1.05 * counted["keys"]
    assert all(la["loads_max"] > 0 for la in counted["score"])


if __name__ == "__main__":
    _child()
