"""Ragged batches: every sample of a padded ragged batch gives exactly what it gives alone (its padding
removed), on every backend, for tv_score, topk_select, score_select, group_merge and
bypass_align(_into); plus the padded layout, the widths' rules and their errors."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import python_ref
import swiftvlm_kernels as sk

from conftest import DTYPES

# cuda-emu: the CUDA kernels of csrc/ on the CPU emulation (tests/cuda_emulator.py), reached through the
# same wrappers as the real backends (see _cuda_emu_backend).
CUDA_EMU = ["cuda-emu"] if __import__("shutil").which("g++") else []
BACKENDS = ["torch", "cpu"] + CUDA_EMU
TRITON = ["triton"] if __import__("os").environ.get("TRITON_INTERPRET") == "1" else []
# Backends whose per-sample arithmetic cannot depend on the rest of the batch (one program per sample):
# bit-equal to the sample alone. torch and cpu compute the logits with batched BLAS, whose rounding
# can depend on the batch and on the memory alignment of a slice: their scores agree within fp32
# rounding, and their selections are exactly those of their own scores.
EXACT = {"triton", "cuda-emu"}
FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module", autouse=True)
def _cuda_emu_backend():
    """sk.<op>(..., backend="cuda-emu") runs the emulated CUDA backend's function, after the wrappers'
    own argument handling (defaults, widths filled, checks), as backend="cuda" would on a GPU."""
    from swiftvlm_kernels import _backend

    module, emulated = _backend.module, []

    def module_or_emulated(op, device_type, backend=None):
        if backend != "cuda-emu":
            return module(op, device_type, backend)
        if not emulated:
            import cuda_emulator

            emulated.append(cuda_emulator.backend())
        return emulated[0]

    _backend.module = module_or_emulated
    yield
    _backend.module = module


def _ragged_attention(data, dtype):
    """A ragged batch drawn by Hypothesis: q, k, key_mask, vis_start, vis_len, keep."""
    B = data.draw(st.integers(1, 4), label="B")
    Hkv = data.draw(st.sampled_from([1, 2]), label="Hkv")
    G = data.draw(st.sampled_from([1, 3, 4]), label="G")
    D = data.draw(st.sampled_from([4, 7, 16]), label="D")
    L = data.draw(st.integers(1, 40), label="L")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    vis_len = torch.tensor([data.draw(st.integers(0, L), label=f"vis_len{b}") for b in range(B)])
    vis_start = torch.tensor([data.draw(st.integers(0, L - int(n)), label=f"start{b}") for b, n in enumerate(vis_len)])
    keep = torch.tensor([data.draw(st.integers(0, int(n)), label=f"keep{b}") for b, n in enumerate(vis_len)])
    mask = None
    if data.draw(st.booleans(), label="left padding"):
        pad = [data.draw(st.integers(0, int(s)), label=f"pad{b}") for b, s in enumerate(vis_start)]
        mask = torch.arange(L)[None, :] >= torch.tensor(pad)[:, None]
    return q, k, mask, vis_start, vis_len, keep


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_score_select_ragged_equals_each_sample_alone(backend, dtype, data):
    q, k, mask, vis_start, vis_len, keep = _ragged_attention(data, dtype)
    extra = data.draw(st.integers(0, 3), label="extra width")
    W = min(int(vis_len.max()) + extra, k.shape[2])
    K = min(int(keep.max()) + extra, W)
    keep_idx, rest_idx, scores = sk.score_select(q, k, vis_start, vis_len, keep, key_mask=mask, max_vis_len=W,
                                                 max_keep=K, backend=backend)
    assert keep_idx.shape == (q.shape[0], K) and rest_idx.shape == scores.shape == (q.shape[0], W)
    for b in range(q.shape[0]):
        n, kb = int(vis_len[b]), int(keep[b])
        one = sk.score_select(q[b:b + 1], k[b:b + 1], vis_start[b:b + 1], n, kb,
                              key_mask=None if mask is None else mask[b:b + 1], backend=backend)
        assert not scores[b, n:].any() and (keep_idx[b, kb:] == -1).all() and (rest_idx[b, n - kb:] == -1).all()
        if backend in EXACT:
            assert torch.equal(scores[b, :n], one[2][0])
            assert torch.equal(keep_idx[b, :kb], one[0][0]) and torch.equal(rest_idx[b, :n - kb], one[1][0])
        else:
            torch.testing.assert_close(scores[b, :n], one[2][0], rtol=4 * FP32_EPS, atol=1e-30)
        own_keep, own_rest = python_ref.topk_select(scores[b:b + 1, :n], kb)  # the selection of its own scores
        assert torch.equal(keep_idx[b, :kb], own_keep[0]) and torch.equal(rest_idx[b, :n - kb], own_rest[0])
    alone_tv = sk.tv_score(q, k, vis_start, vis_len, key_mask=mask, max_vis_len=W, backend=backend)
    assert torch.equal(alone_tv, scores)


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@given(data=st.data())
def test_topk_select_ragged_equals_each_row_alone(backend, data):
    B = data.draw(st.integers(1, 4))
    N = data.draw(st.integers(0, 30))
    lengths = torch.tensor([data.draw(st.integers(0, N)) for _ in range(B)])
    k = torch.tensor([data.draw(st.integers(0, int(n))) for n in lengths])
    special = data.draw(st.sampled_from(["none", "ties", "nan"]))
    scores = torch.randn(B, N, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    if special == "ties":
        scores = scores.round()
    elif special == "nan" and N:
        scores[:, ::3] = float("nan")
    K = int(k.max()) if B else 0
    keep, rest = sk.topk_select(scores, k, lengths=lengths, max_k=K, backend=backend)
    assert keep.shape == (B, K) and rest.shape == (B, N)
    for b in range(B):
        n, kb = int(lengths[b]), int(k[b])
        one_keep, one_rest = sk.topk_select(scores[b:b + 1, :n], kb, backend=backend)
        assert torch.equal(keep[b, :kb], one_keep[0]) and (keep[b, kb:] == -1).all()
        assert torch.equal(rest[b, :n - kb], one_rest[0]) and (rest[b, n - kb:] == -1).all()


# the Triton interpreter takes about a second per example here: the fast tier runs it at bf16 only
@pytest.mark.parametrize("backend,dtype", [
    pytest.param(b, d, id=f"{b}-{str(d).split('.')[-1]}",
                 marks=[pytest.mark.slow] if b == "triton" and d != torch.bfloat16 else [])
    for b in BACKENDS + TRITON for d in DTYPES])
@given(data=st.data())
def test_group_merge_and_bypass_ragged_equal_each_sample_alone(backend, dtype, data):
    B = data.draw(st.integers(1, 4))
    R = data.draw(st.integers(1, 24))
    d = data.draw(st.sampled_from([1, 5, 16]))
    lengths = torch.tensor([data.draw(st.integers(0, R)) for _ in range(B)])
    Z = torch.tensor([data.draw(st.integers(min(1, int(n)), int(n))) for n in lengths])
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    h = torch.randn(B, R, d, generator=g).to(dtype)
    Zw = int(Z.max()) + data.draw(st.integers(0, 2))
    Zw = min(Zw, R)
    merged, group, counts = sk.group_merge(h, Z, lengths=lengths, max_groups=Zw, backend=backend)
    assert merged.shape == (B, Zw, d) and group.shape == (B, R) and counts.shape == (B, Zw)
    now = (merged.float() + torch.randn(B, Zw, d, generator=g)).to(dtype)
    out = sk.bypass_align(h, group, now, merged, backend=backend)
    dst = torch.randn(B, R + 3, d, generator=g).to(dtype)
    rows = torch.stack([torch.randperm(R + 3, generator=g)[:R] for _ in range(B)])
    into = sk.bypass_align_into(dst.clone(), rows, h, group, now, merged, backend=backend)
    for b in range(B):
        n, zb = int(lengths[b]), int(Z[b])
        assert (group[b, n:] == -1).all() and not counts[b, zb:].any() and not merged[b, zb:].any()
        assert torch.equal(out[b, n:], h[b, n:])  # padding rows pass through
        if n == 0:
            continue
        m1, g1, c1 = sk.group_merge(h[b:b + 1, :n], zb, backend=backend)
        assert torch.equal(group[b, :n], g1[0]) and torch.equal(counts[b, :zb], c1[0])
        assert torch.equal(merged[b, :zb], m1[0])
        o1 = sk.bypass_align(h[b:b + 1, :n], g1, now[b:b + 1, :zb], m1, backend=backend)
        assert torch.equal(out[b, :n], o1[0])
        d1 = sk.bypass_align_into(dst[b:b + 1].clone(), rows[b:b + 1, :n], h[b:b + 1, :n], g1, now[b:b + 1, :zb], m1,
                                  backend=backend)
        assert torch.equal(into[b], d1[0])  # padding rows (group -1) write nothing


def test_int_counts_with_a_width_are_refused():
    q, k = torch.randn(1, 2, 4), torch.randn(1, 1, 6, 4)
    with pytest.raises(ValueError, match="max_vis_len: a padded width goes with per-sample counts"):
        sk.tv_score(q, k, torch.tensor([0]), 3, max_vis_len=4)
    with pytest.raises(ValueError, match="max_k"):
        sk.topk_select(torch.randn(1, 5), 2, max_k=3)


def test_ragged_errors_name_the_argument():
    q, k = torch.randn(2, 2, 4), torch.randn(2, 1, 6, 4)
    vs = torch.tensor([0, 1])
    cases = [
        (dict(vis_len=torch.tensor([3, 7]), keep=torch.tensor([1, 1])), "vis_len: expected at most max_vis_len"),
        (dict(vis_len=torch.tensor([3, 6]), keep=torch.tensor([1, 1])), "vis_start: expected a visual span"),
        (dict(vis_len=torch.tensor([3, 2]), keep=torch.tensor([1, 3])), "keep: expected at most the sample's vis_len"),
        (dict(vis_len=torch.tensor([3, 2]), keep=torch.tensor([1])), r"keep: expected shape \[2\]"),
        (dict(vis_len=torch.tensor([3.0, 2.0]), keep=torch.tensor([1, 1])), "vis_len: expected dtype int64 or int32"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            sk.score_select(q, k, vs, kw["vis_len"], kw["keep"], max_vis_len=6 if "7" in str(kw["vis_len"]) else None)
    with pytest.raises(ValueError, match="num_groups: expected 1 <= num_groups"):
        sk.group_merge(torch.randn(2, 5, 3), torch.tensor([0, 2]), lengths=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="lengths: expected at most R"):
        sk.group_merge(torch.randn(2, 5, 3), torch.tensor([1, 2]), lengths=torch.tensor([6, 5]))
    with pytest.raises(ValueError, match="max_groups: expected the padded width"):
        sk.group_merge(torch.randn(2, 5, 3), torch.tensor([1, 2]), max_groups=6)


def test_widths_are_required_when_tracing():
    q, k = torch.randn(2, 2, 4), torch.randn(2, 1, 6, 4)
    vs, vl = torch.tensor([0, 1]), torch.tensor([3, 5])

    def f(q, k, vs, vl):
        return torch.ops.swiftvlm.tv_score(q, k, vs, vl, 0.5)

    with pytest.raises(Exception, match="max_vis_len: expected the padded width"):
        torch.compile(f, fullgraph=True, backend="eager")(q, k, vs, vl)

    def g(q, k, vs, vl):
        return torch.ops.swiftvlm.score_select(q, k, vs, vl, vl // 2, 0.5, max_vis_len=5, max_keep=2)

    got = torch.compile(g, fullgraph=True, backend="eager")(q, k, vs, vl)
    want = python_ref.score_select(q, k, vs, vl, vl // 2, 0.5, max_vis_len=5, max_keep=2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_compact_and_restore_ragged_equal_each_sample_alone(backend, dtype, data):
    """A ragged stage: each sample's block holds its own kept and target rows, then zero padding rows;
    restoring gives back each sample's sequence (its block's padding rows zero)."""
    B = data.draw(st.integers(1, 4))
    M = data.draw(st.integers(0, 12))
    pre, post = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 3))  # the last token is text
    n, d = pre + M + post, data.draw(st.sampled_from([1, 6]))
    vis_len = torch.tensor([data.draw(st.integers(0, M)) for _ in range(B)])
    keep = torch.tensor([data.draw(st.integers(0, int(v))) for v in vis_len])
    merge = torch.tensor([data.draw(st.integers(min(1, int(v - kb)), int(v - kb))) for v, kb in zip(vis_len, keep)])
    K, Zw = int(keep.max()), int(merge.max()) + data.draw(st.integers(0, 1))
    Zw = min(Zw, M)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    h = torch.randn(B, n, d, generator=g).to(dtype)
    vis_start = torch.full((B,), pre)
    keep_idx, rest_idx = python_ref.topk_select(torch.randn(B, M, generator=g), keep, vis_len, K)
    h_new, src, rest_h, merged_rows, inverse = sk.compact(h, vis_start, keep_idx, rest_idx, merge, max_merged=Zw,
                                                          backend=backend)
    n_new = n - M + K + Zw
    assert h_new.shape == (B, n_new, d) and rest_h.shape == (B, M, d) and merged_rows.shape == (B, Zw)
    reference = python_ref.compact(h, vis_start, keep_idx, rest_idx, merge, Zw)
    for name, got, want in zip(("h_new", "src", "rest_h", "merged_rows", "inverse"),
                               (h_new, src, rest_h, merged_rows, inverse), reference):
        assert torch.equal(got, want), name
    # a later layer's states: every row changed, then restored with a drift for each group
    h_later = (h_new.float() * 1.5 + 0.25).to(dtype)
    group = torch.stack([torch.where(torch.arange(M) < v - kb, torch.arange(M) % max(int(z), 1), -1)
                         for v, kb, z in zip(vis_len, keep, merge)])
    group = torch.where(merge[:, None] > 0, group, -1)
    merged_then = torch.randn(B, Zw, d, generator=g).to(dtype)
    restored = sk.restore(h_later, inverse, vis_start, rest_idx, rest_h, group, merged_rows, merged_then,
                          backend=backend)
    assert torch.equal(restored, python_ref.restore(h_later, inverse, vis_start, rest_idx, rest_h, group, merged_rows,
                                                    merged_then))
    for b in range(B):
        v, kb, zb, rb = int(vis_len[b]), int(keep[b]), int(merge[b]), int(vis_len[b] - keep[b])
        rows = list(range(pre + v)) + list(range(pre + M, n))  # the sample without its block padding
        one = sk.compact(h[b:b + 1, rows], vis_start[b:b + 1], keep_idx[b:b + 1, :kb], rest_idx[b:b + 1, :rb], zb,
                         backend=backend)
        new_rows = list(range(pre + kb + zb)) + list(range(pre + K + Zw, n_new))
        pad_rows = list(range(pre + kb + zb, pre + K + Zw))
        assert torch.equal(h_new[b, new_rows], one[0][0]) and not h_new[b, pad_rows].any()
        assert torch.equal(rest_h[b, :rb], one[2][0]) and not rest_h[b, rb:].any()
        assert torch.equal(merged_rows[b, :zb] - b * n_new, one[3][0])
        assert torch.equal(merged_rows[b, zb:] - b * n_new, pre + K + torch.arange(zb, Zw))  # padding rows
        one_back = sk.restore(h_later[b:b + 1, new_rows], one[4], vis_start[b:b + 1], rest_idx[b:b + 1, :rb],
                              one[2], group[b:b + 1, :rb], one[3], merged_then[b:b + 1, :zb], backend=backend)
        assert torch.equal(restored[b, rows], one_back[0])
        assert not restored[b, pre + v:pre + M].any()  # the block's padding rows


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_compact_and_restore_ragged_without_merging_equal_each_sample_alone(backend, dtype, data):
    """A ragged stage that merges nothing (ALVTS: the skipped tokens rejoin after the layer): compact
    with Z_b = 0 and width 0, then restore with Z = 0 puts every rest token back unchanged (group not
    read), the carried rows as the layer left them, the block padding rows zero; each sample as alone."""
    B = data.draw(st.integers(1, 4))
    M = data.draw(st.integers(1, 12))
    pre, post = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 3))
    n, d = pre + M + post, data.draw(st.sampled_from([1, 8]))
    vis_len = torch.tensor([data.draw(st.integers(0, M)) for _ in range(B)])
    keep = torch.tensor([data.draw(st.integers(0, int(v))) for v in vis_len])
    K = int(keep.max())
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    h = torch.randn(B, n, d, generator=g).to(dtype)
    vis_start = torch.full((B,), pre)
    keep_idx, rest_idx = python_ref.topk_select(torch.randn(B, M, generator=g), keep, vis_len, K)
    h_new, src, rest_h, merged_rows, inverse = sk.compact(h, vis_start, keep_idx, rest_idx, torch.zeros(B, dtype=torch.long),
                                                          max_merged=0, backend=backend)
    assert merged_rows.shape == (B, 0) and h_new.shape == (B, n - M + K, d)
    h_later = (h_new.float() * 1.5 + 0.25).to(dtype)
    group = torch.randint(-3, 40, (B, M), generator=g)  # not read
    restored = sk.restore(h_later, inverse, vis_start, rest_idx, rest_h, group, merged_rows, rest_h[:, :0],
                          backend=backend)
    assert torch.equal(restored, python_ref.restore(h_later, inverse, vis_start, rest_idx, rest_h, group, merged_rows,
                                                    rest_h[:, :0]))
    for b in range(B):
        v, kb = int(vis_len[b]), int(keep[b])
        rest_rows = (pre + rest_idx[b, :v - kb]).tolist()
        assert torch.equal(restored[b, rest_rows].view(torch.uint8), h[b, rest_rows].view(torch.uint8))
        rows = list(range(pre + v)) + list(range(pre + M, n))
        one = sk.compact(h[b:b + 1, rows], vis_start[b:b + 1], keep_idx[b:b + 1, :kb], rest_idx[b:b + 1, :v - kb], 0,
                         backend=backend)
        new_rows = list(range(pre + kb)) + list(range(pre + K, n - M + K))
        one_back = sk.restore(h_later[b:b + 1, new_rows], one[4], vis_start[b:b + 1], rest_idx[b:b + 1, :v - kb],
                              one[2], group[b:b + 1, :v - kb], one[3], one[2][:, :0], backend=backend)
        assert torch.equal(restored[b, rows], one_back[0])
        assert not restored[b, pre + v:pre + M].any()  # the block's padding rows
