"""The group_merge kernels (CUDA through the CPU emulation, Triton through the interpreter, and both on
a GPU when there is one) on the paths of their design: every tile shape of the assign kernel, many
segments of the sort, groups of very unequal sizes, Z = R, batches, strided h and d that is no
multiple of the vector width, NaN / inf / zero rows, determinism and thread schedules.

Group ids must equal python_ref's (random inputs have no near-ties at fp32 resolution; the cosines
of both are fp64 rounded once to fp32), and every merged row must equal, bit for bit, the fp32 sum of
the group's members added in ascending index order divided by the count: the reference's
scatter_add order, which the kernels keep.
"""
import importlib
import os
import shutil

import pytest
import torch

import python_ref

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EMU_TILES = ("64", "32", "16", "8")  # BM of the CUDA assign kernel's tile shapes (64x64 .. 8x8)
TRITON_TILES = ((64, 64), (32, 32), (16, 16))


def _triton_module():
    importlib.import_module("swiftvlm_kernels.triton_kernels")
    return importlib.import_module("swiftvlm_kernels.triton_kernels.group_merge")


def _params(large=False):
    """large: inputs of thousands of rows, which the Triton interpreter takes a minute over (full tier
    only there); otherwise the fast tier runs Triton at its smallest tile (the most programs)."""
    no_gxx = shutil.which("g++") is None
    out = [pytest.param(("cuda-emu", "cpu", tile), id=f"cuda-emu-{tile}",
                        marks=pytest.mark.skipif(no_gxx, reason="the CUDA emulation compiles csrc/ with g++"))
           for tile in EMU_TILES]
    out += [pytest.param(("triton", "cpu", tile), id=f"triton-cpu-{tile[0]}",
                         marks=[pytest.mark.skipif(not INTERPRET, reason="Triton runs CPU tensors only interpreted"),
                                *([pytest.mark.slow] if large or tile[0] != 16 else []),
                                # a minute each in the interpreter: the large inputs at the smallest tile
                                # (the most programs) only; a GPU runs them at every tile
                                *([pytest.mark.skip(reason="large inputs run interpreted at the 16 x 16 tile only")]
                                  if large and tile[0] != 16 else [])])
            for tile in TRITON_TILES]
    out += [pytest.param(("triton", "cuda", tile), id=f"triton-cuda-{tile[0]}",
                         marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")])
            for tile in TRITON_TILES]
    out += [pytest.param(("cuda", "cuda", None), id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not CUDA, reason="needs a CUDA device")])]
    return out


def _merge(request, monkeypatch):
    """(group_merge function, device) with the backend's assign tile shape forced to the param's."""
    name, device, tile = request.param
    if name == "cuda-emu":
        import cuda_emulator

        monkeypatch.setenv("SWIFTVLM_GROUP_MERGE_TILE", tile)  # read by the emulation build only
        return cuda_emulator.backend().group_merge, device
    if name == "cuda":
        module = importlib.import_module("swiftvlm_kernels.cuda_backend")
        if not module.available():
            pytest.skip(module.reason)
        return module.group_merge, device
    monkeypatch.setattr(_triton_module(), "_tile_override", tile)
    return _triton_module().group_merge, device


@pytest.fixture(params=_params())
def merge(request, monkeypatch):
    return _merge(request, monkeypatch)


@pytest.fixture(params=_params(large=True))
def merge_large(request, monkeypatch):
    return _merge(request, monkeypatch)


def _sequential_mean(h, group, Z):
    """fp32 sum of each group's members in ascending index order, / count, in h's dtype."""
    B, R, d = h.shape
    hf = h.float()
    counts = torch.stack([torch.bincount(g, minlength=Z) for g in group])
    order = torch.argsort(group * R + torch.arange(R), dim=1)  # (group, index) order
    start = torch.cumsum(counts, 1) - counts
    rank = torch.empty_like(group)
    rank.scatter_(1, order, torch.arange(R).expand(B, R) - start.gather(1, group.gather(1, order)))
    acc = torch.zeros(B, Z, d)
    for k in range(int(counts.max())):  # the k-th member of every group: one add per group and step
        b, i = torch.nonzero(rank == k, as_tuple=True)
        acc[b, group[b, i]] = acc[b, group[b, i]] + hf[b, i]
    return (acc / counts[:, :, None].float()).to(h.dtype), counts.int()


def _same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _check(merge, device, h, Z, h_device=None):
    """h_device: h's view on the device when .to(device) would not keep its strides."""
    merged, group, counts = (t.cpu() for t in merge(h.to(device) if h_device is None else h_device, Z))
    want_merged, want_group, want_counts = python_ref.group_merge(h, Z)
    assert torch.equal(group, want_group)
    assert torch.equal(counts, want_counts)
    mean, _ = _sequential_mean(h, group, Z)
    assert merged.dtype == h.dtype and _same(merged, mean)
    assert _same(merged, want_merged)  # the reference sums in the same order
    return merged, group, counts


@pytest.mark.parametrize("B,R,Z,d,dtype", [
    pytest.param(2, 1500, 3, 40, torch.float32, marks=pytest.mark.slow),  # few targets, six segments of the sort
    pytest.param(1, 300, 300, 12, torch.float32, marks=pytest.mark.slow),  # Z = R: every token is a target
    (3, 257, 20, 37, torch.float32),    # d no multiple of the vector width (scalar loads)
    (2, 200, 9, 72, torch.bfloat16),    # 16-byte vectors of bf16
    (2, 260, 33, 36, torch.float16),    # 36 = 4 x 8 + 4: scalar loads for fp16
])
def test_random_tokens(merge, B, R, Z, d, dtype):
    fn, device = merge
    g = torch.Generator().manual_seed(R + Z + d)
    _check(fn, device, torch.randn(B, R, d, generator=g).to(dtype), Z)


def test_one_group_holds_almost_every_token(merge_large):
    """Every non-target token points near target 0: one group of R - Z + 1 members over many
    segments and member chunks, the other groups of one."""
    fn, device = merge_large
    g = torch.Generator().manual_seed(5)
    B, R, Z, d = 2, 1200, 6, 24
    t = python_ref.group_targets(R, Z)
    h = 0.01 * torch.randn(B, R, d, generator=g) + (0.5 + torch.rand(B, R, 1, generator=g)) * torch.eye(d)[0]
    h[:, t[1:]] = torch.eye(d)[1:Z]  # the other targets are orthogonal to target 0
    _, group, counts = _check(fn, device, h, Z)
    assert counts[:, 0].tolist() == [R - Z + 1] * B and torch.all(counts[:, 1:] == 1)


def test_many_segments(merge_large):
    """More segments than one block of the mean kernel covers (64 x 256 tokens): chunks of segments."""
    fn, device = merge_large
    g = torch.Generator().manual_seed(6)
    _check(fn, device, torch.randn(1, 64 * 256 + 300, 4, generator=g), 3)


def test_strided_h(merge):
    """h read in place: rows of a transposed buffer (no unit stride anywhere) and every other feature."""
    fn, device = merge
    g = torch.Generator().manual_seed(7)
    B, R, Z, d = 2, 150, 7, 20
    for h in (torch.randn(B, d, R, generator=g).to(device).transpose(1, 2),
              torch.randn(B, R, 2 * d, generator=g).to(torch.bfloat16).to(device)[..., ::2]):
        assert not h.is_contiguous()
        _check(fn, device, h.cpu(), Z, h_device=h)


def test_special_rows(merge):
    """NaN and inf rows, a zero token and a zero target (similarity 0, not NaN), duplicate targets."""
    fn, device = merge
    g = torch.Generator().manual_seed(8)
    B, R, Z, d = 2, 90, 10, 16  # targets 0, 9, 18, ...
    h = torch.randn(B, R, d, generator=g)
    h[0, 0] = 0.0  # zero target of group 0
    h[0, 5] = 0.0  # zero token: similarity 0 to every target, also to the zero one: group 0
    h[0, 7, 3] = float("nan")  # NaN token: every similarity NaN, all tie: group 0
    h[1, 9, 2] = float("nan")  # NaN target: its group keeps it, nobody else joins
    h[1, 11, 0] = float("inf")  # inf token: NaN similarities
    h[1, 27] = 4.0 * h[1, 18]  # target of group 3 parallel to target 2: ties go to group 2
    h[1, 30] = -2.0 * h[1, 18]
    h[1, 31] = h[1, 18]
    merged, group, counts = _check(fn, device, h, Z)
    assert group[0, 5] == 0 and group[0, 7] == 0 and group[1, 31] == 2 and counts[1, 1] == 1


def test_repeated_runs_are_bit_equal(merge_large):
    fn, device = merge_large
    g = torch.Generator().manual_seed(9)
    h = torch.randn(3, 400, 48, generator=g).to(torch.bfloat16).to(device)
    first = fn(h, 19)
    for _ in range(2):
        for a, b in zip(fn(h, 19), first):
            assert torch.equal(a, b)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulation compiles csrc/ with g++")
@pytest.mark.parametrize("schedule", ["reverse", "random", "warps"])
@pytest.mark.parametrize("tile", EMU_TILES)
def test_emulated_thread_schedules(schedule, tile, monkeypatch):
    """The CUDA kernels with their threads in another order between barriers: bit-equal results."""
    import cuda_emulator

    monkeypatch.setenv("SWIFTVLM_GROUP_MERGE_TILE", tile)
    emu = cuda_emulator.backend()
    g = torch.Generator().manual_seed(10)
    h = torch.randn(2, 530, 40, generator=g)
    h[1, 100:400] = h[1, 0] * torch.rand(300, 1, generator=g)  # a large group
    with cuda_emulator.schedule("forward"):
        want = emu.group_merge(h, 11)
    for seed in (3, 4):
        with cuda_emulator.schedule(schedule, seed=seed):
            got = emu.group_merge(h, 11)
        for a, b in zip(got, want):
            assert torch.equal(a, b), schedule
    assert torch.equal(want[1], python_ref.group_merge(h, 11)[1])
