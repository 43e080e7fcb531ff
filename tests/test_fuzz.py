"""Every op called with random arguments, most of them wrong, through the Python API
(`swiftvlm_kernels.<op>`, which calls `torch.ops.swiftvlm.<op>`): the call either raises a ValueError
that starts with the name of one of the op's arguments, or returns what python_ref returns for the
same arguments (bit for bit: on CPU tensors the ops run the cpu backend, which keeps the reference's
arithmetic). Any other exception, or a silently different result, fails.

Derandomized in CI (the same examples every run); SWIFTVLM_FUZZ_EXAMPLES=2000 hunts locally.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import python_ref
import swiftvlm_kernels  # noqa: F401  (registers the ops)
from swiftvlm_kernels.schemas import OPS, RAGGED, SIGNATURES

EXAMPLES = int(os.environ.get("SWIFTVLM_FUZZ_EXAMPLES", 150))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="SWIFTVLM_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=list(HealthCheck))

# the padded-form ops and their arguments, from the registered schemas
ARGS = {op: tuple(name for name, _ in SIGNATURES[op].positional) for op in OPS
        if "cu_seqlens" not in SIGNATURES[op].names}
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
WRONG = [torch.float64, torch.int64, torch.bool]


def size(draw, low=0, high=5):
    return draw(st.integers(low, high))


def floats(draw, shape, wrong=0.05):
    dtype = draw(st.sampled_from(WRONG)) if draw(st.floats(0, 1)) < wrong else draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(shape, generator=g) * draw(st.sampled_from([1.0, 1e-3, 50.0]))
    if draw(st.floats(0, 1)) < 0.1 and x.numel():
        flat = x.view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return x.to(dtype)


def ints(draw, shape, low, high, wrong=0.05):
    dtype = draw(st.sampled_from([torch.float32, torch.bool])) if draw(st.floats(0, 1)) < wrong else \
        draw(st.sampled_from([torch.int64, torch.int32]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return torch.randint(low, max(high, low + 1), shape, generator=g).to(dtype)


def count(draw, typical):
    """An int argument: usually plausible, sometimes negative, too large, a bool or a float."""
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.sampled_from([True, 2.0, "3", None]))
    if kind == 1:
        return draw(st.integers(-3, -1))
    return draw(st.integers(0, max(typical, 0) + 2))


def mangle(draw, args):
    """Now and then one argument of the wrong kind or shape."""
    args = list(args)
    if draw(st.floats(0, 1)) < 0.08:
        i = draw(st.integers(0, len(args) - 1))
        a = args[i]
        if isinstance(a, torch.Tensor):
            args[i] = draw(st.sampled_from([a.tolist() if a.numel() < 50 else 3, a[..., None], a.reshape(-1)]))
    return args


def partition(draw, B, M, k):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    perm = torch.stack([torch.randperm(M, generator=g) for _ in range(B)]) if B else torch.zeros(0, M, dtype=torch.long)
    return perm[:, :k].sort(1).values, perm[:, k:].sort(1).values


@st.composite
def attention_args(draw, op):
    B, H, Hkv, L, D = size(draw, 0, 3), size(draw, 0, 4), size(draw, 0, 3), size(draw, 0, 12), size(draw, 0, 5)
    q = floats(draw, (B, H, D))
    k = floats(draw, (B, Hkv, L, D)).to(q.dtype) if draw(st.floats(0, 1)) < 0.95 else floats(draw, (B, Hkv, L, D))
    vis_len = count(draw, L)
    vis_start = ints(draw, (B,), -1, max(L - (vis_len if isinstance(vis_len, int) else 0), 0) + 2)
    scale = draw(st.sampled_from([0.3, 1.0, float("nan"), 2]))
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(B, L, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) > 0.3
        if draw(st.floats(0, 1)) < 0.05:
            mask = mask.int()
    if op == "tv_score":
        return mangle(draw, (q, k, vis_start, vis_len, scale, mask))
    return mangle(draw, (q, k, vis_start, vis_len, count(draw, vis_len if isinstance(vis_len, int) else 3), scale,
                         mask))


@st.composite
def importance_args(draw):
    """attention_importance: q [B, H, L, E], k [B, Hk, L, E] (now and then a wrong shape or dtype)."""
    B, H, Hk, L, E = size(draw, 0, 3), size(draw, 0, 4), size(draw, 0, 3), size(draw, 0, 12), size(draw, 0, 5)
    q = floats(draw, (B, H, L, E))
    Lk = L if draw(st.floats(0, 1)) < 0.95 else L + 1
    k = floats(draw, (B, Hk, Lk, E)).to(q.dtype) if draw(st.floats(0, 1)) < 0.95 else floats(draw, (B, Hk, Lk, E))
    vis_len = count(draw, L)
    vis_start = ints(draw, (B,), -1, max(L - (vis_len if isinstance(vis_len, int) else 0), 0) + 2)
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(B, L, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) > 0.3
        if draw(st.floats(0, 1)) < 0.05:
            mask = mask.int()
    return mangle(draw, (q, k, vis_start, vis_len, draw(st.sampled_from([0.3, 1.0, float("nan"), 2])), mask))


@st.composite
def topk_args(draw):
    B, N = size(draw, 0, 3), size(draw, 0, 20)
    return mangle(draw, (floats(draw, (B, N)), count(draw, N)))


@st.composite
def merge_args(draw):
    B, R, d = size(draw, 0, 3), size(draw, 0, 9), size(draw, 0, 6)
    return mangle(draw, (floats(draw, (B, R, d)), count(draw, R)))


@st.composite
def align_args(draw, into):
    B, R, Z, d = size(draw, 0, 3), size(draw, 0, 7), size(draw, 0, 3), size(draw, 0, 5)
    h = floats(draw, (B, R, d))
    group = ints(draw, (B, R), -1, Z + 1)
    now, then = floats(draw, (B, Z, d)).to(h.dtype), floats(draw, (B, Z, d)).to(h.dtype)
    if not into:
        return mangle(draw, (h, group, now, then))
    M = size(draw, 0, 10)
    dst = floats(draw, (B, M, d)).to(h.dtype)
    return mangle(draw, (dst, ints(draw, (B, R), -1, M + 1), h, group, now, then))


@st.composite
def compact_args(draw):
    B, n, d = size(draw, 0, 3), size(draw, 0, 14), size(draw, 0, 5)
    M = draw(st.integers(0, n + 1))
    k = draw(st.integers(0, M))
    keep, rest = partition(draw, B, M, k)
    if draw(st.floats(0, 1)) < 0.2 and keep.numel():
        keep = keep.flip(1) if draw(st.booleans()) else keep + 1
    vis_start = ints(draw, (B,), -1, n - M + 2)
    return mangle(draw, (floats(draw, (B, n, d)), vis_start, keep, rest, count(draw, M - k)))


@st.composite
def restore_args(draw):
    B, n, d = size(draw, 1, 3), size(draw, 1, 12), size(draw, 1, 4)
    M = draw(st.integers(1, n))
    k = draw(st.integers(0, M - 1))
    Z = draw(st.integers(0, M - k))  # Z = 0: nothing merged, the rest back unchanged, group not read
    keep, rest = partition(draw, B, M, k)
    vis_start = torch.randint(0, n - M + 1, (B,), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    h = floats(draw, (B, n, d), wrong=0)
    h_new, _, rest_h, merged_rows, inverse = python_ref.compact(h, vis_start, keep, rest, Z)
    group = ints(draw, (B, M - k), 0, Z, wrong=0) if Z else ints(draw, (B, M - k), -50, 50, wrong=0)
    then = floats(draw, (B, Z, d), wrong=0).to(h.dtype)
    args = [h_new, inverse, vis_start, rest, rest_h, group, merged_rows, then]
    if draw(st.floats(0, 1)) < 0.3:  # corrupt one index
        i = draw(st.sampled_from([1, 3, 5, 6]))
        args[i] = args[i] + draw(st.sampled_from([-100, 1, 1000]))
    return mangle(draw, args)


def same(a, b):
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num()) and \
        torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else torch.equal(a, b)


def names_arguments(op, message: str) -> bool:
    """The message starts with one or more of the op's argument names ("h: ...", "inverse, rest_idx: ...",
    or "keep_idx, rest_idx: ..." for the select ops' outputs), then a colon."""
    head, colon, _ = message.partition(":")
    names = [n.strip() for n in head.split(",")]
    return bool(colon) and all(n in ARGS[op] + ("keep_idx", "rest_idx") for n in names)


def run_and_check(op, args):
    fn = getattr(swiftvlm_kernels, op)
    mutated = op == "bypass_align_into"
    call = [a.clone() if isinstance(a, torch.Tensor) and mutated else a for a in args]
    try:
        out = fn(*call)
    except ValueError as e:
        assert names_arguments(op, str(e)), f"{op}: message names no argument: {e}"
        return
    ref = [a.clone() if isinstance(a, torch.Tensor) and mutated else a for a in args]
    want = getattr(python_ref, op)(*ref)
    if mutated:
        out, want = call[0], ref[0]
    assert same(out, want), f"{op}: differs from python_ref"


@SETTINGS
@given(st.data())
@pytest.mark.parametrize("op", list(ARGS))
def test_every_op_rejects_or_matches_the_reference(op, data):
    strategy = {"tv_score": attention_args("tv_score"), "score_select": attention_args("score_select"),
                "topk_select": topk_args(), "group_merge": merge_args(), "bypass_align": align_args(False),
                "bypass_align_into": align_args(True), "compact": compact_args(), "restore": restore_args(),
                "attention_importance": importance_args()}[op]
    run_and_check(op, data.draw(strategy))


TRITON_SETTINGS = settings(max_examples=max(10, EXAMPLES // 5), deadline=None,
                           derandomize="SWIFTVLM_FUZZ_EXAMPLES" not in os.environ, suppress_health_check=list(HealthCheck))


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
@TRITON_SETTINGS
@given(st.data())
@pytest.mark.parametrize("op", list(ARGS))
def test_every_op_on_triton_rejects_or_matches_the_reference(op, data):
    """The same through the Triton kernels (CPU tensors under the interpreter): values within fp32
    rounding of python_ref's where arithmetic is involved, selections and copies exact."""
    strategy = {"tv_score": attention_args("tv_score"), "score_select": attention_args("score_select"),
                "topk_select": topk_args(), "group_merge": merge_args(), "bypass_align": align_args(False),
                "bypass_align_into": align_args(True), "compact": compact_args(), "restore": restore_args(),
                "attention_importance": importance_args()}[op]
    args = data.draw(strategy)
    with swiftvlm_kernels.use_backend("triton"):
        try:
            out = getattr(swiftvlm_kernels, op)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        except ValueError as e:
            assert names_arguments(op, str(e)), str(e)
            return
    want = getattr(python_ref, op)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    if op == "bypass_align_into":
        return  # (the mutated dst is compared in test_backends; here: no crash, no bad error)
    outs, wants = (out, want) if isinstance(out, tuple) else ((out,), (want,))
    for a, b in zip(outs, wants):
        assert a.shape == b.shape and a.dtype == b.dtype
        if not a.is_floating_point() and op in ("topk_select", "compact"):
            assert torch.equal(a, b), op


# ---------------------------------------------------------------- the ragged and packed overloads
# Per-sample counts as int tensors, padded widths as keyword-only ints: counts past the widths, widths
# past the shapes, negative counts, gaps and overlaps in compact's slots. A call either raises a
# ValueError naming one of the overload's arguments or gives python_ref's result (bit for bit on the cpu
# backend; on Triton and the emulated CUDA kernels: integer outputs exact, scores within fp32 rounding).

RAGGED_OPS = sorted(RAGGED)


def rarely(draw, percent):
    """True in about `percent` % of the draws (Hypothesis' floats lean to 0, so no float threshold)."""
    return draw(st.integers(0, 999)) >= 1000 - 10 * percent  # small integers are drawn most


def _floats(draw, shape):
    """floats() whose dtype is wrong only rarely."""
    x = floats(draw, shape, wrong=0)
    return x.to(torch.float64) if rarely(draw, 3) else x


def _counts(draw, B, high):
    """Per-sample counts in [0, high], now and then one out of range."""
    values = [draw(st.integers(0, max(high, 0))) for _ in range(B)]
    if B and rarely(draw, 8):
        values[draw(st.integers(0, B - 1))] = draw(st.sampled_from([-1, high + 1, high + 5]))
    return torch.tensor(values, dtype=draw(st.sampled_from([torch.int64, torch.int32])))


def _width(draw, counts, cap):
    """The padded width of counts: usually max(counts) plus a little, sometimes too small or past cap."""
    top = int(counts.max()) if counts.numel() else 0
    kind = draw(st.integers(0, 99))
    if kind < 5:
        return max(top - 1, 0) if top else draw(st.sampled_from([-1, 0]))
    if kind < 8:
        return cap + 1
    return min(top + draw(st.integers(0, 2)), max(cap, top))


@st.composite
def ragged_args(draw, op):
    """(args, kwargs) of one call of a ragged or packed overload."""
    B = size(draw, 1, 3)
    if op in ("tv_score.ragged", "score_select.ragged", "tv_score_varlen", "score_select_varlen",
              "attention_importance.ragged"):
        Hkv, G, D = size(draw, 1, 2), size(draw, 1, 3), size(draw, 1, 5)
        L = size(draw, 1, 12)
        rows = (L,) if op == "attention_importance.ragged" else ()  # its q has a row per token
        q = _floats(draw, (B, Hkv * G, *rows, D))
        k = floats(draw, (B, Hkv, L, D), wrong=0).to(q.dtype)
        vis_len = _counts(draw, B, L)
        W = _width(draw, vis_len, L)
        vis_start = torch.tensor([draw(st.integers(0, max(L - max(int(n), 0), 0))) for n in vis_len])
        if rarely(draw, 4):
            vis_start[0] = L
        keep = _counts(draw, B, max(int(vis_len.clamp_min(0).min()), 0))
        K = _width(draw, keep, max(W, 0))
        if op.endswith("_varlen"):
            lengths = [draw(st.integers(min(int(s) + max(int(n), 0), L), L)) for s, n in zip(vis_start, vis_len)]
            cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            packed = torch.cat([k[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)]) if B else \
                k[:, :, :0].reshape(0, Hkv, D)
            if rarely(draw, 4):
                cu = cu.flip(0)
            kw = dict(max_vis_len=W, max_seqlen=draw(st.sampled_from([None, max(lengths), L + 1])))
            if op == "tv_score_varlen":
                return [q, packed, cu, vis_start, vis_len, 0.5], kw
            return [q, packed, cu, vis_start, vis_len, keep, 0.5], dict(kw, max_keep=K)
        mask = (torch.rand(B, L, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) > 0.2) \
            if draw(st.booleans()) else None
        if op in ("tv_score.ragged", "attention_importance.ragged"):
            return [q, k, vis_start, vis_len, 0.5, mask], dict(max_vis_len=W)
        return [q, k, vis_start, vis_len, keep, 0.5, mask], dict(max_vis_len=W, max_keep=K)
    if op == "topk_select.ragged":
        N = size(draw, 0, 20)
        scores = _floats(draw, (B, N))
        lengths = _counts(draw, B, N) if draw(st.booleans()) else None
        k = _counts(draw, B, min(int(lengths.clamp_min(0).min()), N) if lengths is not None else N)
        return [scores, k], dict(lengths=lengths, max_k=_width(draw, k, N))
    if op == "group_merge.ragged":
        R, d = size(draw, 0, 9), size(draw, 1, 5)
        h = _floats(draw, (B, R, d))
        lengths = _counts(draw, B, R) if draw(st.booleans()) else None
        top = lengths.clamp_min(0) if lengths is not None else torch.full((B,), R)
        Z = torch.tensor([draw(st.integers(min(1, int(n)), max(int(n), 0))) for n in top])
        if rarely(draw, 8):
            Z[0] = draw(st.sampled_from([0, int(top[0]) + 1, -1]))
        return [h, Z], dict(lengths=lengths, max_groups=_width(draw, Z, R))
    assert op == "compact.ragged", op
    d = size(draw, 1, 4)
    M = size(draw, 1, 8)
    n = M + size(draw, 0, 4)
    m_b = [draw(st.integers(0, M)) for _ in range(B)]  # each sample's block slots
    k_b = [draw(st.integers(0, m)) for m in m_b]
    K = max(k_b) + draw(st.integers(0, 1))
    K = min(K, M)
    keep = torch.full((B, K), -1, dtype=torch.long)
    rest = torch.full((B, M), -1, dtype=torch.long)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    for b in range(B):
        perm = torch.randperm(m_b[b], generator=g)
        keep[b, :k_b[b]] = perm[:k_b[b]].sort().values
        rest[b, :m_b[b] - k_b[b]] = perm[k_b[b]:].sort().values
    corrupt = draw(st.sampled_from(["none"] * 12 + ["gap", "overlap", "order", "range"]))
    b = draw(st.integers(0, B - 1))
    r_b = m_b[b] - k_b[b]
    if corrupt == "gap" and r_b:  # the sample's last rest slot moved past its block
        rest[b, r_b - 1] = m_b[b] if m_b[b] < M else rest[b, r_b - 1]
    elif corrupt == "overlap" and r_b and k_b[b]:
        rest[b, 0] = keep[b, 0]
    elif corrupt == "order" and r_b > 1:
        rest[b, :r_b] = rest[b, :r_b].flip(0)
    elif corrupt == "range":
        rest[b, 0] = draw(st.sampled_from([-2, M, M + 3]))
    num_merged = torch.tensor([draw(st.integers(0, m - kk)) for m, kk in zip(m_b, k_b)])
    if rarely(draw, 8):
        num_merged[b] = r_b + 1
    max_merged = _width(draw, num_merged, M)
    vis_start = torch.tensor([draw(st.integers(0, n - M)) for _ in range(B)])
    if rarely(draw, 4):
        vis_start[b] = n - M + 1
    return [_floats(draw, (B, n, d)), vis_start, keep, rest, num_merged], dict(max_merged=max_merged)


def _ragged_names(op):
    return SIGNATURES[op].names + ("keep_idx", "rest_idx")


def _ragged_backends():
    import shutil

    out = [pytest.param("cpu", id="cpu")]
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
        reason="the triton backend needs a GPU or TRITON_INTERPRET=1")))
    out.append(pytest.param("cuda-emu", id="cuda-emu", marks=pytest.mark.skipif(
        shutil.which("g++") is None, reason="the CUDA emulation compiles csrc/ with g++")))
    return out


def on_backend(backend, op, args, kwargs):
    """One call of a ragged / packed overload on `backend`: cpu through torch.ops.swiftvlm (the CPU
    key's kernel), triton and cuda-emu (the emulated CUDA kernels, as backend="cuda" on a GPU) through
    the op's own argument handling and checks, then the backend's function."""
    from swiftvlm_kernels import ops

    base, _, overload = op.partition(".")
    if backend == "cpu":
        return getattr(getattr(torch.ops.swiftvlm, base), overload or "default")(*args, **kwargs)
    full = ops.prepare(op, args, kwargs)
    if backend == "triton":
        import swiftvlm_kernels.triton_kernels as module
    else:
        import cuda_emulator

        module = cuda_emulator.backend()
    return getattr(module, base)(*full)


# group_merge.ragged under the Triton interpreter takes about 40 s for the fast tier's examples: full tier only
_SLOW_RAGGED = {("group_merge.ragged", "triton")}


def _ragged_cases():
    return [pytest.param(op, b.values[0], id=f"{op}-{b.id}",
                         marks=[*b.marks, *([pytest.mark.slow] if (op, b.values[0]) in _SLOW_RAGGED else [])])
            for op in RAGGED_OPS for b in _ragged_backends()]


@settings(max_examples=max(10, EXAMPLES // 3), deadline=None, derandomize="SWIFTVLM_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=list(HealthCheck))
@given(st.data())
@pytest.mark.parametrize("op, backend", _ragged_cases())
def test_every_ragged_overload_rejects_or_matches_the_reference(op, backend, data):
    args, kwargs = data.draw(ragged_args(op))
    try:
        out = on_backend(backend, op, [a.clone() if isinstance(a, torch.Tensor) else a for a in args], kwargs)
    except ValueError as e:
        head, colon, _ = str(e).partition(":")
        assert colon and all(n.strip() in _ragged_names(op) for n in head.split(",")), f"{op}: {e}"
        return
    from swiftvlm_kernels import _checks

    full = _checks.fill_widths(op, args, kwargs)
    want = getattr(python_ref, op.split(".")[0])(*full)
    outs, wants = (out, want) if isinstance(out, tuple) else ((out,), (want,))
    if "score_select" in op and backend != "cpu":  # near-ties: the selection of the backend's own scores
        sig = SIGNATURES[op].names
        counts, width = full[sig.index("vis_len")], full[sig.index("max_keep")]
        wants = (*python_ref.topk_select(out[2], full[sig.index("keep")], counts, width), want[2])
    for a, b in zip(outs, wants):
        assert a.shape == b.shape and a.dtype == b.dtype, op
        if backend == "cpu" or not a.is_floating_point():
            assert same(a, b), f"{op} on {backend}: differs from python_ref"
        else:
            assert torch.equal(a.isnan(), b.isnan()), op
            torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-6)
