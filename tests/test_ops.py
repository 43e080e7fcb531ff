"""The op layer: registration, opcheck, torch.compile, the backend switch and input errors."""
import pytest
import torch

import python_ref
import swiftvlm_kernels as sk
from swiftvlm_kernels import _backend


def inputs(B=3, H=4, Hkv=2, L=20, D=8, vis_len=9, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    vis_start = torch.tensor([0, 4, 11])[:B]
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[min(1, B - 1), :2] = False
    return q, k, vis_start, vis_len, mask


def merge_inputs(B=2, R=7, Z=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, R, d, generator=g)
    group = torch.randint(0, Z, (B, R), generator=g)
    now, then = torch.randn(B, Z, d, generator=g), torch.randn(B, Z, d, generator=g)
    return h, group, now, then


def test_ops_are_registered():
    for name in _backend.OPS:
        assert hasattr(torch.ops.swiftvlm, name)


def test_score_select_through_torch_ops_matches_reference():
    q, k, vs, vl, mask = inputs()
    got = torch.ops.swiftvlm.score_select(q, k, vs, vl, 4, 0.3, mask)
    want = python_ref.score_select(q, k, vs, vl, 4, 0.3, mask)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    got = torch.ops.swiftvlm.score_select(q, k, vs, vl, 4, 0.3)  # key_mask defaults to all valid
    assert torch.equal(got[2], python_ref.tv_score(q, k, vs, vl, 0.3))


def test_wrappers_default_scale():
    q, k, vs, vl, mask = inputs()
    torch.testing.assert_close(sk.tv_score(q, k, vs, vl), python_ref.tv_score(q, k, vs, vl, 8 ** -0.5))


def compact_inputs(Z=2):
    h = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(0))
    return h, torch.tensor([2, 4]), torch.tensor([[0, 3, 5], [1, 2, 6]]), torch.tensor([[1, 2, 4, 6], [0, 3, 4, 5]]), Z


def restore_inputs(Z=2):
    h, vis_start, keep, rest, Z = compact_inputs(Z)
    h_new, _, rest_h, merged_rows, inverse = python_ref.compact(h, vis_start, keep, rest, Z)
    if not Z:  # nothing merged: the rest comes back unchanged, group is not read
        return h_new, inverse, vis_start, rest, rest_h, rest, merged_rows, rest_h[:, :0]
    merged, group, _ = python_ref.group_merge(rest_h, Z)
    return h_new, inverse, vis_start, rest, rest_h, group, merged_rows, merged


def ragged_attention():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 0] = False
    return q, k, torch.tensor([1, 0]), torch.tensor([5, 8]), torch.tensor([2, 3]), mask


def compact_ragged_inputs():
    q, k, vs, vl, keep, mask = ragged_attention()
    keep_idx, rest_idx, _ = python_ref.score_select(q, k, vs, vl, keep, 0.3, mask, max_vis_len=8, max_keep=3)
    h = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(2))
    return (h, vs, keep_idx, rest_idx, torch.tensor([2, 1])), dict(max_merged=2)


def varlen_inputs(select):
    q, k, vs, vl, keep, _ = ragged_attention()
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)  # samples of 7 and 9 tokens
    packed = torch.cat([k[0, :, :7].transpose(0, 1), k[1].transpose(0, 1)])
    vl = torch.tensor([5, 8])
    if select:
        return (q, packed, cu, vs, vl, keep, 0.3), dict(max_vis_len=8, max_keep=3, max_seqlen=9)
    return (q, packed, cu, vs, vl, 0.3), dict(max_vis_len=8, max_seqlen=9)


# Every registered op and overload (ops.SCHEMAS), with sample calls: (case, args, kwargs). A new op
# without samples fails test_every_op_has_samples.
SAMPLES = {
    "tv_score": [("mask", lambda: (inputs()[:4] + (0.3, inputs()[4])), {}),
                 ("nomask", lambda: (inputs()[:4] + (0.3, None)), {}),
                 ("one_sample", lambda: (inputs(B=1)[:4] + (0.3, inputs(B=1)[4])), {})],
    "topk_select": [("plain", lambda: (torch.randn(3, 11), 4), {})],
    "score_select": [("mask", lambda: (inputs()[:4] + (3, 0.3, inputs()[4])), {}),
                     ("one_sample", lambda: (inputs(B=1)[:4] + (3, 0.3, inputs(B=1)[4])), {})],
    "group_merge": [("plain", lambda: (torch.randn(2, 7, 5), 3), {})],
    "bypass_align": [("plain", lambda: merge_inputs(), {})],
    "bypass_align_into": [("plain", lambda: (torch.zeros(2, 12, 5), torch.tensor([[0, 2, 3, 5, 7, 8, 11]] * 2))
                           + merge_inputs(), {})],
    "compact": [("merge", lambda: compact_inputs(), {}), ("drop", lambda: compact_inputs(Z=0), {})],
    "restore": [("plain", lambda: restore_inputs(), {}), ("unmerged", lambda: restore_inputs(Z=0), {})],
    "attention_importance": [("gqa_mask", lambda: (torch.randn(2, 4, 9, 5), torch.randn(2, 2, 9, 5), torch.tensor([1, 3]),
                                                  4, 0.4, torch.tensor([[True] * 9, [False] + [True] * 8])), {}),
                             ("one_head", lambda: (torch.randn(1, 1, 7, 3), torch.randn(1, 1, 7, 3), torch.tensor([2]), 3,
                                                   0.5, None), {})],
    "attention_importance.ragged": [("counts", lambda: (torch.randn(2, 2, 9, 4), torch.randn(2, 1, 9, 4),
                                                        torch.tensor([1, 0]), torch.tensor([5, 8]), 0.3, None),
                                     dict(max_vis_len=8))],
    "tv_score.ragged": [("mask", lambda: ragged_attention()[:4] + (0.3, ragged_attention()[5]), dict(max_vis_len=8))],
    "topk_select.ragged": [("lengths", lambda: (torch.randn(3, 7), torch.tensor([2, 0, 4])),
                            dict(lengths=torch.tensor([3, 0, 7]), max_k=4))],
    "score_select.ragged": [("mask", lambda: ragged_attention()[:5] + (0.3, ragged_attention()[5]),
                             dict(max_vis_len=8, max_keep=3))],
    "group_merge.ragged": [("lengths", lambda: (torch.randn(2, 6, 5), torch.tensor([2, 1])),
                            dict(lengths=torch.tensor([6, 2]), max_groups=3))],
    "compact.ragged": [("merge", lambda: compact_ragged_inputs()[0], compact_ragged_inputs()[1])],
    "tv_score_varlen": [("packed", lambda: varlen_inputs(False)[0], varlen_inputs(False)[1])],
    "score_select_varlen": [("packed", lambda: varlen_inputs(True)[0], varlen_inputs(True)[1])],
}
CASES = [pytest.param(op, args, kwargs, id=f"{op}-{case}") for op, cases in SAMPLES.items()
         for case, args, kwargs in cases]


def op_overload(op):
    base, _, overload = op.partition(".")
    return getattr(getattr(torch.ops.swiftvlm, base), overload or "default")


def test_every_op_has_samples():
    from swiftvlm_kernels.schemas import SCHEMAS

    assert set(SAMPLES) == set(SCHEMAS)


def test_every_backend_implements_every_op():
    import importlib

    from swiftvlm_kernels.schemas import OPS

    for module in ("python_ref", "swiftvlm_kernels.cpu", "swiftvlm_kernels.triton_kernels",
                   "swiftvlm_kernels.cuda_backend"):
        mod = importlib.import_module(module)
        assert all(callable(getattr(mod, op, None)) for op in OPS), module


@pytest.mark.parametrize("op,args,kwargs", CASES)
def test_opcheck(op, args, kwargs):
    torch.library.opcheck(op_overload(op), args(), kwargs)


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("op,args,kwargs", CASES)
def test_every_op_traces_fullgraph(op, args, kwargs, backend):
    """Every op and overload under torch.compile(fullgraph=True) (the aot_eager backend: the graph
    capture and the fake implementations, without inductor's C++ build) gives the eager call's
    outputs, with each backend chosen by use_backend before compiling."""
    if backend == "triton" and "triton" not in _backend.available_backends("cpu"):
        pytest.skip("the triton backend does not run CPU tensors here")
    args, fn = args(), op_overload(op)
    with sk.use_backend(backend):
        torch._dynamo.reset()
        eager_args, compiled_args = [_clone(a) for a in args], [_clone(a) for a in args]
        want = fn(*eager_args, **kwargs)
        got = torch.compile(lambda *a: fn(*a, **kwargs), backend="aot_eager", fullgraph=True)(*compiled_args)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(compiled_args, eager_args):  # bypass_align_into's dst
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)


def test_per_call_backend_under_compile_is_refused_clearly():
    """`backend=` runs a backend's Python function outside the op: under torch.compile a clear
    ValueError, not a data-dependent guard failure deep in the trace."""
    q, k, vs, vl, keep, mask = ragged_attention()

    def f(q, k):
        return sk.score_select(q, k, vs, vl, keep, 0.3, mask, max_vis_len=8, max_keep=3, backend="torch")

    torch._dynamo.reset()
    with pytest.raises(Exception, match="backend: a per-call backend"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(q, k)


def test_compile_fullgraph_matches_eager():
    q, k, vs, vl, mask = inputs()

    def prune(q, k, vs, mask):
        keep, rest, scores = torch.ops.swiftvlm.score_select(q, k, vs, vl, 4, 0.3, mask)
        return keep, rest, scores * 2

    eager = prune(q, k, vs, mask)
    compiled = torch.compile(prune, fullgraph=True)(q, k, vs, mask)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_compile_fullgraph_merge_and_align():
    h, group, now, then = merge_inputs()

    def step(h, now):
        merged, grp, counts = torch.ops.swiftvlm.group_merge(h, 3)
        return torch.ops.swiftvlm.bypass_align(h, grp, now, merged), counts

    eager = step(h, now)
    compiled = torch.compile(step, fullgraph=True)(h, now)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# ---- backend switch ----

def test_backend_keyword_and_set_backend():
    q, k, vs, vl, mask = inputs()
    want = python_ref.tv_score(q, k, vs, vl, 0.3, mask)
    assert torch.equal(sk.tv_score(q, k, vs, vl, 0.3, mask, backend="torch"), want)
    assert torch.equal(sk.tv_score(q, k, vs, vl, 0.3, mask, backend="cpu"), want)
    with sk.use_backend("torch"):
        assert torch.equal(torch.ops.swiftvlm.tv_score(q, k, vs, vl, 0.3, mask), want)
        assert sk.set_backend("torch") == "torch"
    with pytest.raises(ValueError, match="backend: expected one of auto, torch, cpu, triton, cuda"):
        sk.tv_score(q, k, vs, vl, 0.3, mask, backend="nonsense")
    with pytest.raises(ValueError, match="backend: expected one of"):
        sk.set_backend("nonsense")
    assert torch.equal(torch.ops.swiftvlm.tv_score(q, k, vs, vl, 0.3, mask), want)


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("SWIFTVLM_BACKEND", "torch")
    previous = sk.set_backend()  # None: re-read SWIFTVLM_BACKEND
    try:
        assert _backend.default("score_select", "cpu") is python_ref.score_select
    finally:
        sk.set_backend(previous)
    monkeypatch.setenv("SWIFTVLM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SWIFTVLM_BACKEND"):
        sk.set_backend()


def test_auto_on_cpu_is_the_cpu_backend():
    import swiftvlm_kernels.cpu as cpu

    assert _backend.module("score_select", "cpu", "auto") is cpu
    assert _backend.default("score_select", "cpu") is cpu.score_select
    assert _backend.module("score_select", "meta", "auto") is python_ref


def test_dispatch_by_device_key():
    """The CPU, CUDA and catch-all keys each have a kernel of their own (no per-call lookup)."""
    for op in _backend.OPS:
        name = f"swiftvlm::{op}"
        for key in ("CPU", "CUDA", "CompositeExplicitAutograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (op, key)


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    q, k, vs, vl, mask = inputs()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        sk.tv_score(q, k, vs, vl, backend="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, vs, vl, mask = inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sk.tv_score(q, k, vs, vl, backend="triton")


# ---- bad input: every case raises a ValueError naming the argument ----

def _bad_score_calls():
    q, k, vs, vl, mask = inputs()
    ok = dict(q=q, k=k, vis_start=vs, vis_len=vl, keep=3, scale=0.3, key_mask=mask)
    cases = {
        "q rank": (dict(q=q[0]), "q: expected a 3-D tensor"),
        "k rank": (dict(k=k[0]), "k: expected a 4-D tensor"),
        "q int dtype": (dict(q=q.long()), "q: expected dtype float32, float16 or bfloat16"),
        "k dtype mismatch": (dict(k=k.half()), "k: expected dtype torch.float32"),
        "k device mismatch": (dict(k=k.to("meta")), "k: expected device cpu"),
        "batch mismatch": (dict(k=k[:2]), "k: expected batch size 3"),
        "head dim mismatch": (dict(k=k[..., :4]), "k: expected head dim 8"),
        "H not multiple of Hkv": (dict(k=torch.randn(3, 3, 20, 8)), "divides the 4 query heads"),
        "vis_start float": (dict(vis_start=vs.float()), "vis_start: expected dtype int32 or int64"),
        "vis_start shape": (dict(vis_start=vs[:2]), "vis_start: expected shape \\[3\\]"),
        "vis_start rank": (dict(vis_start=vs[None]), "vis_start: expected a 1-D tensor"),
        "vis_len > L": (dict(vis_len=21, keep=3), "vis_len: expected the number of visual tokens"),
        "vis_len negative": (dict(vis_len=-1, keep=0), "vis_len"),
        "span past L": (dict(vis_start=torch.tensor([0, 4, 12])), "vis_start: expected 0 <= vis_start"),
        "vis_start negative": (dict(vis_start=torch.tensor([0, -1, 2])), "vis_start: expected 0 <= vis_start"),
        "keep > vis_len": (dict(keep=10), "keep: expected the number of visual tokens to keep"),
        "keep negative": (dict(keep=-1), "keep"),
        "mask dtype": (dict(key_mask=mask.int()), "key_mask: expected dtype torch.bool"),
        "mask shape": (dict(key_mask=mask[:, :5]), "key_mask: expected shape \\[3, 20\\]"),
        "scale nan": (dict(scale=float("nan")), "scale: expected a finite float"),
    }
    return ok, cases


@pytest.mark.parametrize("case", sorted(_bad_score_calls()[1]))
def test_bad_score_select_input(case):
    ok, cases = _bad_score_calls()
    change, message = cases[case]
    a = {**ok, **change}
    with pytest.raises(ValueError, match=message):
        torch.ops.swiftvlm.score_select(a["q"], a["k"], a["vis_start"], a["vis_len"], a["keep"], a["scale"], a["key_mask"])


def test_bad_tv_score_and_topk_input():
    q, k, vs, vl, mask = inputs()
    with pytest.raises(ValueError, match="k: expected a number of KV heads"):
        torch.ops.swiftvlm.tv_score(q, torch.randn(3, 3, 20, 8), vs, vl, 0.3)
    with pytest.raises(ValueError, match="scores: expected a 2-D tensor"):
        torch.ops.swiftvlm.topk_select(torch.randn(5), 2)
    with pytest.raises(ValueError, match=r"k: expected the number of indices to keep, in \[0, N\] \(0 <= k <= 5\), got 6"):
        torch.ops.swiftvlm.topk_select(torch.randn(2, 5), 6)
    with pytest.raises(ValueError, match="k: expected the number of indices"):
        torch.ops.swiftvlm.topk_select(torch.randn(2, 5), -1)
    with pytest.raises(ValueError, match="scores: expected dtype float32"):
        torch.ops.swiftvlm.topk_select(torch.arange(10).reshape(2, 5), 1)


def test_bad_group_merge_input():
    h = torch.randn(2, 7, 5)
    with pytest.raises(ValueError, match=r"num_groups: expected the number of groups Z, in \[1, R\]"):
        torch.ops.swiftvlm.group_merge(h, 0)
    with pytest.raises(ValueError, match="num_groups"):
        torch.ops.swiftvlm.group_merge(h, 8)
    with pytest.raises(ValueError, match="h: expected a 3-D tensor"):
        torch.ops.swiftvlm.group_merge(h[0], 2)
    with pytest.raises(ValueError, match="R >= 1"):
        torch.ops.swiftvlm.group_merge(h[:, :0], 1)


def test_bad_bypass_align_input():
    h, group, now, then = merge_inputs()
    bad = {
        "group: expected shape \\[2, 7\\]": (h, group[:, :3], now, then),
        "group: expected dtype int64 or int32": (h, group.float(), now, then),
        "group: expected a 2-D tensor": (h, group[0], now, then),
        "group: expected ids in \\[0, 3\\)": (h, group + 1, now, then),
        "merged_now: expected dtype torch.float32": (h, group, now.half(), then),
        "merged_then: expected shape \\[2, Z, 5\\]": (h, group, now, then[..., :4]),
        "merged_then: expected the shape of merged_now": (h, group, now, then[:, :2]),
        "h_rest: expected a 3-D tensor": (h[0], group, now, then),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            torch.ops.swiftvlm.bypass_align(*args)
    dst = torch.zeros(2, 9, 5)
    rows = torch.arange(7).expand(2, 7)
    with pytest.raises(ValueError, match="rows: expected row indices in \\[0, 9\\)"):
        torch.ops.swiftvlm.bypass_align_into(dst, rows + 3, h, group, now, then)
    with pytest.raises(ValueError, match="rows: expected shape \\[2, 7\\]"):
        torch.ops.swiftvlm.bypass_align_into(dst, rows[:, :2], h, group, now, then)
    with pytest.raises(ValueError, match="dst: expected dtype torch.float32"):
        torch.ops.swiftvlm.bypass_align_into(dst.half(), rows, h, group, now, then)


def test_value_checks_skipped_where_values_cannot_be_read():
    """On meta tensors values cannot be read; the checks that need them are skipped, shapes still checked."""
    q, k, vs, vl, mask = (t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs())
    out = torch.ops.swiftvlm.score_select(q, k, vs, vl, 3, 0.3, mask)
    assert out[0].shape == (3, 3) and out[2].dtype == torch.float32
    with pytest.raises(ValueError, match="keep"):
        torch.ops.swiftvlm.score_select(q, k, vs, vl, 10, 0.3, mask)


@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
def test_use_backend_triton_gives_the_reference_results():
    """use_backend("triton") routes every torch.ops.swiftvlm op to the Triton kernels (CUDA tensors
    on a GPU, else CPU tensors through the interpreter) and they give python_ref's results."""
    with sk.use_backend("triton"):
        _check_ops_against_reference()


def _check_ops_against_reference():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, vs, vl, mask = inputs()
    scores = torch.ops.swiftvlm.tv_score(q.to(dev), k.to(dev), vs.to(dev), vl, 0.3, mask.to(dev)).cpu()
    torch.testing.assert_close(scores, python_ref.tv_score(q, k, vs, vl, 0.3, mask), rtol=1e-5, atol=1e-7)
    keep, rest, own = (t.cpu() for t in torch.ops.swiftvlm.score_select(q.to(dev), k.to(dev), vs.to(dev), vl, 4, 0.3,
                                                                         mask.to(dev)))
    want_keep, want_rest = python_ref.topk_select(own, 4)  # selection exact on the kernel's own scores
    assert torch.equal(keep, want_keep) and torch.equal(rest, want_rest)
    s = torch.randn(3, 37)
    for a, b in zip(torch.ops.swiftvlm.topk_select(s.to(dev), 11), python_ref.topk_select(s, 11)):
        assert torch.equal(a.cpu(), b)
    h, group, now, then = merge_inputs()
    for a, b in zip(torch.ops.swiftvlm.group_merge(h.to(dev), 3), python_ref.group_merge(h, 3)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)
    got = torch.ops.swiftvlm.bypass_align(h.to(dev), group.to(dev), now.to(dev), then.to(dev)).cpu()
    assert torch.equal(got, python_ref.bypass_align(h, group, now, then))
    dst, want = torch.zeros(2, 12, 5, device=dev), torch.zeros(2, 12, 5)
    rows = torch.tensor([[0, 2, 3, 5, 7, 8, 11]] * 2)
    torch.ops.swiftvlm.bypass_align_into(dst, rows.to(dev), h.to(dev), group.to(dev), now.to(dev), then.to(dev))
    python_ref.bypass_align_into(want, rows, h, group, now, then)
    assert torch.equal(dst.cpu(), want)


def test_bad_compact_and_restore_input():
    h, vis_start, keep, rest, Z = compact_inputs()
    bad = {
        "h: expected a 3-D tensor": (h[0], vis_start, keep, rest, Z),
        "vis_start: expected shape \\[2\\]": (h, vis_start[:1], keep, rest, Z),
        "keep_idx: expected dtype int64 or int32": (h, vis_start, keep.float(), rest, Z),
        "rest_idx: expected shape \\[2, 4\\]": (h, vis_start, keep, rest[:1], Z),
        "keep_idx, rest_idx: expected k \\+ R <= n": (h[:, :6], vis_start, keep, rest, Z),
        "num_merged: expected the number of merged tokens": (h, vis_start, keep, rest, 5),
        "vis_start: expected 0 <= vis_start": (h, torch.tensor([2, 6]), keep, rest, Z),
        "keep_idx, rest_idx: expected block slots in \\[0, 7\\)": (h, vis_start, keep, rest + 1, Z),
        "keep_idx, rest_idx: expected the slots 0..6 of each sample's block exactly once":
            (h, vis_start, keep, torch.tensor([[1, 1, 4, 6], [0, 3, 4, 5]]), Z),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            torch.ops.swiftvlm.compact(*args)
    args = list(restore_inputs())
    for index, value, message in (
            (1, args[1][:, :5] + 100, "inverse: expected flattened rows of h"),
            (5, args[5] + 2, "group: expected group ids"),
            (6, args[6] + 100, "merged_rows: expected flattened rows of h"),
            (4, args[4].half(), "h_rest: expected dtype torch.float32"),
            (3, args[3] + 6, "rest_idx: expected rows vis_start")):
        call = list(args)
        call[index] = value
        if index == 1:  # a shorter inverse makes a shorter restored sequence: rows must fit
            call[1] = value.clamp(max=100)
        with pytest.raises(ValueError, match=message):
            torch.ops.swiftvlm.restore(*call)


# ---- in-place writes: refused where they would be wrong (every backend validates alike) ----

@pytest.mark.parametrize("backend", [None, "torch", "cpu"] + (["triton"] if __import__("os").environ.get(
    "TRITON_INTERPRET") == "1" else []))
def test_bypass_align_into_refuses_unsafe_destinations(backend):
    h, group, now, then = merge_inputs()
    rows = torch.tensor([[0, 2, 3, 5, 7, 8, 11]] * 2)
    big = torch.zeros(2, 12, 5)
    cases = {
        "dst: expected memory that does not overlap h_rest": (torch.cat([h, torch.zeros(2, 5, 5)], 1), h),
        "dst: expected a tensor without zero strides": (torch.zeros(1, 12, 5).expand(2, 12, 5), h),
        "dst: expected a tensor that does not require grad": (big.clone().requires_grad_(), h),
        "dst: expected a tensor whose elements do not overlap": (torch.zeros(200).as_strided((2, 12, 5), (5, 1, 1)), h),
    }
    for message, (dst, h_rest) in cases.items():
        if "overlap h_rest" in message:  # h_rest is a view of dst's memory
            h_rest = dst[:, :7]
        with pytest.raises(ValueError, match=message):
            sk.bypass_align_into(dst, rows, h_rest, group, now, then, backend=backend)
    base = torch.zeros(2, 12, 5, requires_grad=True)
    with pytest.raises(ValueError, match="dst: expected a tensor that does not require grad \\(nor its base\\)"):
        with torch.no_grad():
            view = base[:, :]
        sk.bypass_align_into(view, rows, h, group, now, then, backend=backend)
    with pytest.raises(ValueError, match="dst: expected memory that does not overlap merged_now"):
        sk.bypass_align_into(big, rows, h, group, big[:, :3], then, backend=backend)


def test_bypass_align_into_accepts_separate_strided_destinations():
    h, group, now, then = merge_inputs()
    rows = torch.tensor([[0, 2, 3, 5, 7, 8, 11]] * 2)
    dst = torch.zeros(2, 5, 24).transpose(1, 2)[:, ::2]  # strided, no overlap
    want = torch.zeros(2, 12, 5)
    python_ref.bypass_align_into(want, rows, h, group, now, then)
    sk.bypass_align_into(dst, rows, h, group, now, then)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("backend", [None, "cpu"])
def test_bypass_align_into_bumps_the_version_of_dst(backend):
    """The kernels run their functions below autograd; the op itself marks dst written, as an in-place
    torch op does (autograd then refuses a backward through a stale saved dst)."""
    h, group, now, then = merge_inputs()
    rows = torch.tensor([[0, 2, 3, 5, 7, 8, 11]] * 2)
    dst = torch.zeros(2, 12, 5)
    before = dst._version
    sk.bypass_align_into(dst, rows, h, group, now, then, backend=backend)
    assert dst._version > before
    before = dst._version
    torch.ops.swiftvlm.bypass_align_into(dst, rows, h, group, now, then)
    assert dst._version == before + 1


@pytest.mark.parametrize("backend", [None, "cpu"])
def test_bypass_align_into_writes_inference_tensors_only_in_inference_mode(backend):
    h, group, now, then = merge_inputs()
    rows = torch.tensor([[0, 2, 3, 5, 7, 8, 11]] * 2)
    want = torch.zeros(2, 12, 5)
    python_ref.bypass_align_into(want, rows, h, group, now, then)
    with torch.inference_mode():
        dst = torch.zeros(2, 12, 5)
        sk.bypass_align_into(dst, rows, h, group, now, then, backend=backend)
    assert torch.equal(dst, want)
    with pytest.raises(ValueError, match="dst: expected a tensor that may be written here: an inference tensor"):
        sk.bypass_align_into(dst, rows, h, group, now, then, backend=backend)


def test_kernels_run_their_functions_below_autograd():
    """A kernel's own torch calls record no autograd graph (the op is what autograd sees)."""
    seen = []

    def spy(*args):
        seen.append(torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality))
        return real(*args)

    from swiftvlm_kernels import _backend

    h, group, now, then = merge_inputs()
    _backend.default("bypass_align", "cpu")
    real = _backend.resolved[("cpu", "bypass_align")]
    _backend.resolved[("cpu", "bypass_align")] = spy
    try:
        out = torch.ops.swiftvlm.bypass_align(h, group, now, then)
    finally:
        _backend.resolved[("cpu", "bypass_align")] = real
    assert seen == [True] and torch.equal(out, python_ref.bypass_align(h, group, now, then))


# ---- empty shapes: an empty result, or a ValueError naming what must not be empty ----

def test_empty_shapes():
    i64 = dict(dtype=torch.long)
    ok = {
        "tv_score B=0": lambda b: sk.tv_score(torch.randn(0, 4, 8), torch.randn(0, 2, 10, 8), torch.zeros(0, **i64), 5,
                                              backend=b),
        "tv_score L=0": lambda b: sk.tv_score(torch.randn(2, 4, 8), torch.randn(2, 2, 0, 8), torch.zeros(2, **i64), 0,
                                              backend=b),
        "score_select vis_len=0": lambda b: sk.score_select(torch.randn(2, 4, 8), torch.randn(2, 2, 6, 8),
                                                            torch.zeros(2, **i64), 0, 0, backend=b),
        "topk_select N=0": lambda b: sk.topk_select(torch.randn(3, 0), 0, backend=b),
        "topk_select B=0": lambda b: sk.topk_select(torch.randn(0, 5), 2, backend=b),
        "group_merge B=0": lambda b: sk.group_merge(torch.randn(0, 5, 3), 2, backend=b),
        "group_merge d=0": lambda b: sk.group_merge(torch.randn(2, 5, 0), 2, backend=b),
        "bypass_align R=0": lambda b: sk.bypass_align(torch.randn(2, 0, 4), torch.zeros(2, 0, **i64),
                                                      torch.randn(2, 1, 4), torch.randn(2, 1, 4), backend=b),
        "compact M=0": lambda b: sk.compact(torch.randn(2, 6, 4), torch.zeros(2, **i64), torch.zeros(2, 0, **i64),
                                            torch.zeros(2, 0, **i64), 0, backend=b),
        "compact n=0": lambda b: sk.compact(torch.randn(2, 0, 4), torch.zeros(2, **i64), torch.zeros(2, 0, **i64),
                                            torch.zeros(2, 0, **i64), 0, backend=b),
    }
    for name, call in ok.items():
        torch.manual_seed(0)
        got = call(None)
        torch.manual_seed(0)
        want = call("torch")
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"q: expected at least one query head"):
        sk.tv_score(torch.randn(2, 0, 8), torch.randn(2, 1, 10, 8), torch.zeros(2, **i64), 5)
    with pytest.raises(ValueError, match=r"q: expected at least one feature per head"):
        sk.tv_score(torch.randn(2, 4, 0), torch.randn(2, 2, 10, 0), torch.zeros(2, **i64), 5)  # default scale: D ** -0.5
    with pytest.raises(ValueError, match=r"h: expected at least one rest token"):
        sk.group_merge(torch.randn(2, 0, 4), 1)


# ---- Python types: a ValueError naming the argument, not the dispatcher's RuntimeError ----

def test_wrong_python_types_name_the_argument():
    q, k, vs, vl, mask = inputs()
    for args, message in (((q.tolist(), k, vs, vl), "q: expected a torch.Tensor"),
                          ((q, k, vs, 2.0), "vis_len: expected an int, got float"),
                          ((q, k, vs, True), "vis_len: expected an int, got bool"),
                          ((q, k, vs, vl, "0.3"), "scale: expected a float, got str"),
                          ((q, k, vs, vl, 0.3, [1]), "key_mask: expected a torch.Tensor or None")):
        with pytest.raises(ValueError, match=message):
            sk.tv_score(*args)
    with pytest.raises(ValueError, match="k: expected an int, got NoneType"):
        sk.topk_select(torch.randn(2, 5), None)


# ---- torch.compile with dynamic shapes and torch.export ----

def test_compile_dynamic_sizes_vary_between_calls():
    q, k, vs, vl, mask = inputs()

    def prune(q, k, keep):
        return torch.ops.swiftvlm.score_select(q, k, vs, vl, keep, 0.3, mask)

    compiled = torch.compile(prune, fullgraph=True, dynamic=True)
    for keep in (2, 3, 5, 9):
        for a, b in zip(compiled(q, k, keep), prune(q, k, keep)):
            assert torch.equal(a, b)
    s = torch.randn(3, 40)
    topk = torch.compile(lambda s, k: torch.ops.swiftvlm.topk_select(s, k), fullgraph=True, dynamic=True)
    for n, kk in ((40, 7), (25, 11), (33, 0)):
        for a, b in zip(topk(s[:, :n], kk), python_ref.topk_select(s[:, :n], kk)):
            assert torch.equal(a, b)
    h = torch.randn(2, 30, 8)
    merge = torch.compile(lambda h, z: torch.ops.swiftvlm.group_merge(h, z), fullgraph=True, dynamic=True)
    for R, Z in ((30, 4), (17, 3), (9, 9)):
        for a, b in zip(merge(h[:, :R], Z), python_ref.group_merge(h[:, :R], Z)):
            assert torch.equal(a, b)


def test_export_with_a_dynamic_dimension():
    class Prune(torch.nn.Module):
        def forward(self, q, k, vis_start):
            keep_idx, rest_idx, scores = torch.ops.swiftvlm.score_select(q, k, vis_start, 9, 4, 0.3)
            return keep_idx, scores

    q, k, vs, vl, mask = inputs()
    batch = torch.export.Dim("batch", min=1, max=64)
    length = torch.export.Dim("length", min=10, max=4096)
    ep = torch.export.export(Prune(), (q, k, vs), dynamic_shapes={"q": {0: batch}, "k": {0: batch, 2: length},
                                                                 "vis_start": {0: batch}})
    for B, L in ((3, 20), (2, 31)):
        g = torch.Generator().manual_seed(B + L)
        q2, k2 = torch.randn(B, 4, 8, generator=g), torch.randn(B, 2, L, 8, generator=g)
        vs2 = torch.arange(B) % 3
        for a, b in zip(ep.module()(q2, k2, vs2), Prune()(q2, k2, vs2)):
            assert torch.equal(a, b)


def test_readme_using_the_ops_example_runs():
    """README "Using the ops": its code block runs as written and gives the reference's selection."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    at = text.index("## Using the ops")
    code = re.search(r"```python\n(.*?)```", text[at:], re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README Using the ops", "exec"), scope)
    q, k, vis_start = scope["q"], scope["k"], scope["vis_start"]
    want = python_ref.score_select(q, k, vis_start, 576, 192, 128 ** -0.5)
    assert torch.equal(scope["keep_idx"], want[0]) and torch.equal(scope["rest_idx"], want[1])


def test_every_op_is_found_by_its_name():
    """For every op, a file named after it (the packed forms: varlen; bypass_align_into: bypass_align's)
    in python_ref/, cpu/, triton_kernels/ defining the op's function, its CUDA kernels in csrc/<op>.cu
    (the packed forms run the ragged kernels of tv_score / score_select), and its tests in tests/."""
    import ast
    from pathlib import Path

    from swiftvlm_kernels.schemas import OPS

    root = Path(__file__).resolve().parents[1]
    for op in OPS:
        name = "bypass_align" if op == "bypass_align_into" else "varlen" if op.endswith("_varlen") else op
        for folder in ("python_ref", "swiftvlm_kernels/cpu", "swiftvlm_kernels/triton_kernels"):
            tree = ast.parse((root / folder / f"{name}.py").read_text())
            assert op in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{folder}/{name}.py: {op}"
        assert (root / "csrc" / f"{name if name != 'varlen' else op.replace('_varlen', '')}.cu").is_file(), op
        assert (root / "tests" / f"test_{name}.py").is_file(), op
