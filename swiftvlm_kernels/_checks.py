"""Input validation shared by the real and the fake (meta) implementations of every op.

Every error is a ValueError that names the argument and says what was expected.

Shape, rank, dtype, device, stride and aliasing checks run on every call (they read only metadata).
Checks that read tensor VALUES (vis_start + vis_len <= L, slots, group ids, rows; with
SWIFTVLM_DEBUG=1 also NaN / inf in q, k and the hidden states) run when the tensor lives on the CPU,
and on a GPU only when SWIFTVLM_DEBUG=1, because reading a GPU value synchronises with the host and
breaks CUDA-graph capture. Kernels never touch memory out of bounds either way. Sizes may be SymInts
(torch.compile with dynamic shapes, torch.export); a check on a SymInt records a guard.

A check runs on every op call (bench/host.py measures what an op call costs above its function): the
value checks of several steps read the values through numpy views of the CPU tensors (`_host`; a numpy
step on a few hundred ints costs about a microsecond, a torch op several: dispatch and a fresh tensor
each); a lone range is one torch.aminmax, or a list's min and max up to 64 values.
"""
import os

import numpy as np
import torch

from .schemas import RAGGED

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


def fail(msg):
    raise ValueError(msg)


def _debug():  # read once per op call
    return os.environ.get("SWIFTVLM_DEBUG", "0") == "1"


def readable(t):
    """True when t holds values (not a fake or meta tensor)."""
    return type(t) is torch.Tensor or not torch._subclasses.fake_tensor.is_fake(t)  # plain tensors: fast


def value_checks_run(t) -> bool:
    """Whether the checks that read tensor values run for tensors on t's device (CPU tensors always;
    others only with SWIFTVLM_DEBUG=1, since reading a device value synchronises with the host)."""
    return t.device.type == "cpu" or _debug()


def _read_values(t):
    """True when the values of t may be read here without a host sync (or debug mode asks for it)."""
    if not readable(t):
        return False
    if t.is_cpu:
        return True
    return t.device.type != "meta" and _debug()


def _host(t):
    """The values of t (a CPU tensor, or any tensor in debug mode; see _read_values) as a numpy array:
    a view of a CPU tensor's memory, integer tensors as int64."""
    if not t.is_cpu:
        t = t.cpu()
    try:
        a = t.numpy()
    except (RuntimeError, TypeError):  # a wrapper tensor without numpy memory: its values as a list
        a = np.asarray(t.tolist(), dtype=np.float64 if t.is_floating_point() else np.int64).reshape(tuple(t.shape))
    return a.astype(np.int64, copy=False) if a.dtype.kind in "iu" else a


_AMIN, _AMAX = np.minimum.reduce, np.maximum.reduce  # ndarray.min / max without their Python wrapper


def _min_max(t):
    """(min, max) of a non-empty integer tensor (or numpy array of one) whose values may be read."""
    if isinstance(t, torch.Tensor):  # one reduction of a tensor: aminmax is one op, numpy would be two
        if t.dim() <= 2 and t.numel() <= 64:  # a few values: a list is cheaper still
            values = t.tolist()
            if t.dim() == 2:
                values = [v for row in values for v in row]
            return min(values), max(values)
        return tuple(int(v) for v in torch.aminmax(t))
    return int(_AMIN(t, axis=None)), int(_AMAX(t, axis=None))


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        fail(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_rank(name, t, rank, layout):
    _tensor(name, t)
    if t.dim() != rank:
        fail(f"{name}: expected a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")


def _float(name, t):
    if t.dtype not in FLOAT_DTYPES:
        fail(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")


def _same(name, t, ref_name, ref, dtype=True):
    if not (t.is_cpu and ref.is_cpu) and t.device != ref.device:  # two CPU tensors: the one CPU device
        fail(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        fail(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def check_int(name, value, lo, hi, what):
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        fail(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        fail(f"{name}: expected {what} ({lo} <= {name} <= {hi}), got {value}")


def at_least_one(name, size, what):
    if size < 1:
        fail(f"{name}: expected at least one {what}, got 0")


def _finite(*named):
    """With SWIFTVLM_DEBUG=1: no NaN or inf in the (name, tensor) pairs (the ops' results follow
    torch.softmax otherwise). The environment is read once per call."""
    if not _debug():
        return
    for name, t in named:
        if t.numel() and readable(t) and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            fail(f"{name}: contains NaN or inf (SWIFTVLM_DEBUG=1 checks; without it the results follow the "
                  "rules of the README's Errors section)")


def _check_scores_common(q, k, vis_start, scale, key_mask):
    """q, k, vis_start, scale and key_mask of tv_score / score_select; returns (B, L)."""
    check_rank("q", q, 3, "[B, H, D]")
    _float("q", q)
    check_rank("k", k, 4, "[B, Hkv, L, D]")
    _same("k", k, "q", q)
    B, H, D = q.shape
    _, Hkv, L, Dk = k.shape
    at_least_one("q", H, "query head (q.shape[1])")
    at_least_one("q", D, "feature per head (q.shape[2], D)")
    if k.shape[0] != B:
        fail(f"k: expected batch size {B} (q.shape[0]), got {k.shape[0]}")
    if Dk != D:
        fail(f"k: expected head dim {D} (q.shape[2]), got {Dk}")
    if Hkv == 0 or H % Hkv != 0:
        fail(f"k: expected a number of KV heads that divides the {H} query heads, got Hkv={Hkv}")
    _vis_start_scale_mask(vis_start, scale, key_mask, q, B, L)
    _finite(("q", q), ("k", k))
    return B, L


def _vis_start_scale_mask(vis_start, scale, key_mask, q, B, L):
    check_rank("vis_start", vis_start, 1, "[B]")
    if vis_start.dtype not in INT_DTYPES:
        fail(f"vis_start: expected dtype int32 or int64, got {vis_start.dtype}")
    _same("vis_start", vis_start, "q", q, dtype=False)
    if vis_start.shape[0] != B:
        fail(f"vis_start: expected shape [{B}] (one start per sample), got {tuple(vis_start.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        fail(f"scale: expected a finite float, got {scale!r}")
    if key_mask is not None:
        check_rank("key_mask", key_mask, 2, "[B, L]")
        if key_mask.dtype != torch.bool:
            fail(f"key_mask: expected dtype torch.bool (True = valid key), got {key_mask.dtype}")
        _same("key_mask", key_mask, "q", q, dtype=False)
        if tuple(key_mask.shape) != (B, L):
            fail(f"key_mask: expected shape [{B}, {L}] ([B, L]), got {tuple(key_mask.shape)}")


def check_tv_score(q, k, vis_start, vis_len, scale, key_mask=None):
    B, L = _check_scores_common(q, k, vis_start, scale, key_mask)
    _check_visual_span(vis_start, vis_len, B, L)


def _check_visual_span(vis_start, vis_len, B, L):
    check_int("vis_len", vis_len, 0, L, "the number of visual tokens, at most the sequence length L")
    if B and _read_values(vis_start):
        lo, hi = _min_max(vis_start)
        if lo < 0 or hi + vis_len > L:
            fail(f"vis_start: expected 0 <= vis_start[b] and vis_start[b] + vis_len <= L = {L} "
                  f"(vis_len = {vis_len}), got values in [{lo}, {hi}]")


def _check_importance_common(q, k, vis_start, scale, key_mask):
    """q, k, vis_start, scale and key_mask of attention_importance; returns (B, L)."""
    check_rank("q", q, 4, "[B, H, L, E]")
    _float("q", q)
    check_rank("k", k, 4, "[B, Hk, L, E]")
    _same("k", k, "q", q)
    B, H, L, E = q.shape
    _, Hk, Lk, Ek = k.shape
    at_least_one("q", H, "query head (q.shape[1])")
    at_least_one("q", E, "feature per head (q.shape[3], E)")
    if k.shape[0] != B:
        fail(f"k: expected batch size {B} (q.shape[0]), got {k.shape[0]}")
    if Lk != L:
        fail(f"k: expected {L} rows (q.shape[2], one key per query row), got {Lk}")
    if Ek != E:
        fail(f"k: expected {E} features per head (q.shape[3]), got {Ek}")
    if Hk == 0 or H % Hk != 0:
        fail(f"k: expected a number of key heads that divides the {H} query heads, got Hk={Hk}")
    _vis_start_scale_mask(vis_start, scale, key_mask, q, B, L)
    _finite(("q", q), ("k", k))
    return B, L


def check_attention_importance(q, k, vis_start, vis_len, scale, key_mask=None):
    B, L = _check_importance_common(q, k, vis_start, scale, key_mask)
    _check_visual_span(vis_start, vis_len, B, L)


def check_attention_importance_ragged(q, k, vis_start, vis_len, scale, key_mask=None, max_vis_len=None):
    B, L = _check_importance_common(q, k, vis_start, scale, key_mask)
    _check_ragged_spans(q, vis_start, vis_len, max_vis_len, B, L)


def check_topk_select(scores, k):
    check_rank("scores", scores, 2, "[B, N]")
    _float("scores", scores)
    check_int("k", k, 0, scores.shape[1], "the number of indices to keep, in [0, N]")


def check_score_select(q, k, vis_start, vis_len, keep, scale, key_mask=None):
    check_tv_score(q, k, vis_start, vis_len, scale, key_mask)
    check_int("keep", keep, 0, vis_len, "the number of visual tokens to keep, in [0, vis_len]")


# ---- ragged batches: per-sample counts as int tensors [B] with the padded width as an int ----

def _counts(name, t, B, ref_name, ref, what):
    """An int32 / int64 tensor [B] of per-sample counts on ref's device."""
    _index(name, t, ref_name, ref, (B,), f"([B], {what} of each sample)")


def _width_int(name, value, lo, hi, what):
    if value is None:
        fail(f"{name}: expected the padded width (an int), got None")
    check_int(name, value, lo, hi, what)


def _per_sample(name, t, lo, hi, what):
    """lo[b] <= t[b] <= hi[b] (ints, tensors [B] or numpy arrays [B]) when the values may be read."""
    if not t.numel() or not _read_values(t):
        return
    v = _host(t)
    low = np.broadcast_to(_host(lo) if isinstance(lo, torch.Tensor) else lo, v.shape)
    high = np.broadcast_to(_host(hi) if isinstance(hi, torch.Tensor) else hi, v.shape)
    bad = np.flatnonzero((v < low) | (v > high))
    if bad.size:
        b = int(bad[0])
        fail(f"{name}: expected {what} ({int(low[b])} <= {name}[b] <= {int(high[b])}), got {name}[{b}] = {int(v[b])}")


def fill_widths(op, args, kwargs):
    """The arguments of a ragged or packed overload as one positional list (its keyword-only ones
    appended in schema order) with the padded widths (max_*) filled: a width left out is computed from
    the counts on CPU tensors; on other devices it must be given (reading the counts would synchronise
    with the host, like FlashAttention's max_seqlen)."""
    form = RAGGED[op]
    # the optional trailing positional ones default to None
    args = list(args) + [None] * (form.positional - len(args)) + [kwargs.get(name) for name in form.keywords]
    for width, counts_at, counts_name in form.counts:
        i = form.positional + form.keywords.index(width)
        if args[i] is not None:
            continue
        counts = args[counts_at]
        if isinstance(counts, torch.Tensor) and readable(counts) and counts.device.type == "cpu":
            args[i] = int(counts.max()) if counts.numel() else 0
        else:
            where = f"{counts.device.type} tensors" if isinstance(counts, torch.Tensor) else "these inputs"
            fail(f"{width}: expected the padded width (an int) for {where}: it is computed only from CPU counts "
                 f"(reading {counts_name} on a device would synchronise with the host)")
    return args


def check_tv_score_ragged(q, k, vis_start, vis_len, scale, key_mask=None, max_vis_len=None):
    B, L = _check_scores_common(q, k, vis_start, scale, key_mask)
    _check_ragged_spans(q, vis_start, vis_len, max_vis_len, B, L)


def _check_ragged_spans(q, vis_start, vis_len, max_vis_len, B, L):
    _counts("vis_len", vis_len, B, "q", q, "the number of visual tokens")
    _width_int("max_vis_len", max_vis_len, 0, L, "the padded width of the visual spans, at most L")
    _per_sample("vis_len", vis_len, 0, max_vis_len, "at most max_vis_len")
    if B and _read_values(vis_start) and _read_values(vis_len):
        _per_sample("vis_start", vis_start, 0, L - _host(vis_len),
                    f"a visual span inside the sequence: vis_start[b] + vis_len[b] <= L = {L}")


def check_tv_score_varlen(q, k, cu_seqlens, vis_start, vis_len, scale, max_vis_len=None, max_seqlen=None):
    check_rank("q", q, 3, "[B, H, D]")
    _float("q", q)
    check_rank("k", k, 3, "[total, Hkv, D] (packed keys)")
    _same("k", k, "q", q)
    B, H, D = q.shape
    total, Hkv, Dk = k.shape
    at_least_one("q", H, "query head (q.shape[1])")
    at_least_one("q", D, "feature per head (q.shape[2], D)")
    if Dk != D:
        fail(f"k: expected head dim {D} (q.shape[2]), got {Dk}")
    if Hkv == 0 or H % Hkv != 0:
        fail(f"k: expected a number of KV heads that divides the {H} query heads, got Hkv={Hkv}")
    _index("cu_seqlens", cu_seqlens, "q", q, (B + 1,), "([B + 1], each sample's first packed row, then total)")
    _index("vis_start", vis_start, "q", q, (B,), "([B], each span's start within its sample)")
    _counts("vis_len", vis_len, B, "q", q, "the number of visual tokens")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        fail(f"scale: expected a finite float, got {scale!r}")
    if max_seqlen is not None:
        check_int("max_seqlen", max_seqlen, 0, total, "the longest sample, at most total = k.shape[0]")
    _width_int("max_vis_len", max_vis_len, 0, total if max_seqlen is None else max_seqlen,
               "the padded width of the visual spans, at most the longest sample")
    _per_sample("vis_len", vis_len, 0, max_vis_len, "at most max_vis_len")
    if _read_values(cu_seqlens):
        cu = _host(cu_seqlens)
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            fail(f"cu_seqlens: expected ascending offsets from 0 to total = {total} (k.shape[0]), got {cu.tolist()[:8]}")
        lengths = cu[1:] - cu[:-1]
        if max_seqlen is not None and B and int(lengths.max()) > max_seqlen:
            fail(f"max_seqlen: expected at least the longest sample ({int(lengths.max())} keys), got {max_seqlen}")
        if _read_values(vis_start) and _read_values(vis_len):
            _per_sample("vis_start", vis_start, 0, lengths - _host(vis_len),
                        "a visual span inside its sample: vis_start[b] + vis_len[b] <= its length")
    _finite(("q", q), ("k", k))


def check_score_select_varlen(q, k, cu_seqlens, vis_start, vis_len, keep, scale, max_vis_len=None, max_keep=None,
                              max_seqlen=None):
    check_tv_score_varlen(q, k, cu_seqlens, vis_start, vis_len, scale, max_vis_len, max_seqlen)
    _counts("keep", keep, q.shape[0], "q", q, "the number of visual tokens to keep")
    _width_int("max_keep", max_keep, 0, max_vis_len, "the padded width of keep_idx, in [0, max_vis_len]")
    if _read_values(vis_len):
        _per_sample("keep", keep, 0, vis_len, "at most the sample's vis_len[b]")
    _per_sample("keep", keep, 0, max_keep, "at most max_keep")


def check_topk_select_ragged(scores, k, lengths=None, max_k=None):
    check_rank("scores", scores, 2, "[B, N]")
    _float("scores", scores)
    B, N = scores.shape
    _counts("k", k, B, "scores", scores, "the number of indices to keep")
    if lengths is not None:
        _counts("lengths", lengths, B, "scores", scores, "the number of scores (the rest of the row is padding)")
        _per_sample("lengths", lengths, 0, N, "at most N")
    _width_int("max_k", max_k, 0, N, "the padded width of keep, in [0, N]")
    if lengths is not None and _read_values(lengths):
        _per_sample("k", k, 0, lengths, "at most the sample's lengths[b]")
    _per_sample("k", k, 0, max_k, "at most max_k")


def check_score_select_ragged(q, k, vis_start, vis_len, keep, scale, key_mask=None, max_vis_len=None,
                              max_keep=None):
    check_tv_score_ragged(q, k, vis_start, vis_len, scale, key_mask, max_vis_len)
    _counts("keep", keep, q.shape[0], "q", q, "the number of visual tokens to keep")
    _width_int("max_keep", max_keep, 0, max_vis_len, "the padded width of keep_idx, in [0, max_vis_len]")
    if _read_values(vis_len):
        _per_sample("keep", keep, 0, vis_len, "at most the sample's vis_len[b]")
    _per_sample("keep", keep, 0, max_keep, "at most max_keep")


def check_group_merge(h, num_groups):
    check_rank("h", h, 3, "[B, R, d]")
    _float("h", h)
    R = h.shape[1]
    if R == 0:
        fail("h: expected at least one rest token (R >= 1), got R = 0")
    check_int("num_groups", num_groups, 1, R, "the number of groups Z, in [1, R]")
    _finite(("h", h))


def check_group_merge_ragged(h, num_groups, lengths=None, max_groups=None):
    check_rank("h", h, 3, "[B, R, d]")
    _float("h", h)
    B, R, _ = h.shape
    _counts("num_groups", num_groups, B, "h", h, "the number of groups")
    if lengths is not None:
        _counts("lengths", lengths, B, "h", h, "the number of rest tokens (the rows after them are padding)")
        _per_sample("lengths", lengths, 0, R, "at most R = h.shape[1]")
    _width_int("max_groups", max_groups, 0, R, "the padded width of merged and counts, in [0, R]")
    if _read_values(num_groups) and (lengths is None or _read_values(lengths)):
        n_host = _host(lengths) if lengths is not None else np.full(B, R, dtype=np.int64)
        _per_sample("num_groups", num_groups, np.minimum(n_host, 1), n_host,
                    "1 <= num_groups[b] <= lengths[b] (0 for a sample without rows)")
    _per_sample("num_groups", num_groups, 0, max_groups, "at most max_groups")
    _finite(("h", h))


def check_bypass_align(h_rest, group, merged_now, merged_then):
    check_rank("h_rest", h_rest, 3, "[B, R, d]")
    _float("h_rest", h_rest)
    B, R, d = h_rest.shape
    check_rank("group", group, 2, "[B, R]")
    if group.dtype not in INT_DTYPES:
        fail(f"group: expected dtype int64 or int32, got {group.dtype}")
    _same("group", group, "h_rest", h_rest, dtype=False)
    if tuple(group.shape) != (B, R):
        fail(f"group: expected shape [{B}, {R}] ([B, R], one group id per rest token), got {tuple(group.shape)}")
    for name, m in (("merged_now", merged_now), ("merged_then", merged_then)):
        check_rank(name, m, 3, "[B, Z, d]")
        _same(name, m, "h_rest", h_rest)
        if m.shape[0] != B or m.shape[2] != d:
            fail(f"{name}: expected shape [{B}, Z, {d}], got {tuple(m.shape)}")
    if merged_now.shape != merged_then.shape:
        fail(f"merged_then: expected the shape of merged_now {tuple(merged_now.shape)}, got {tuple(merged_then.shape)}")
    Z = merged_now.shape[1]  # Z = 0 leaves every row's group -1 (a ragged batch without merged tokens)
    if group.numel() and _read_values(group):
        lo, hi = _min_max(group)
        if lo < -1 or hi >= Z:
            fail(f"group: expected ids in [0, {Z}) (Z = merged_now.shape[1]) or -1 (a padding row, left "
                  f"unchanged), got values in [{lo}, {hi}]")


def _byte_span(t):
    """[start, end) bytes of t's elements in memory, or None for an empty or unreadable tensor."""
    if t.numel() == 0 or t.is_meta or not readable(t):
        return None
    if t.is_contiguous():  # dense: the common case, without a loop over the dimensions
        return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
    low = t.data_ptr() + t.element_size() * sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())
                                                if stride < 0)
    return low, low + extent * t.element_size()


def _strides_separate(t):
    """True when no two elements of t share memory: ordered by stride, each dimension's stride exceeds
    the span of the dimensions below it (what torch calls "too hard" to decide is decided here)."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    span = 0
    for stride, size in dims:
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True


def _writable(name, dst, inputs):
    """dst may be written in place: no zero strides, no internal overlap, no shared memory with the
    inputs, no autograd history to corrupt (as torch's own in-place ops refuse)."""
    dense = dst.numel() and dst.is_contiguous()  # then no zero stride and no internal overlap
    if not dense and any(stride == 0 and size > 1 for size, stride in zip(dst.shape, dst.stride())):
        fail(f"{name}: expected a tensor without zero strides (an expanded view writes one element many "
              f"times), got strides {tuple(dst.stride())} for shape {tuple(dst.shape)}")
    if dst.requires_grad or (dst._base is not None and dst._base.requires_grad):
        fail(f"{name}: expected a tensor that does not require grad (nor its base): the op writes it in place "
              "and has no gradient; use a detached tensor or torch.no_grad() on a copy")
    if dst.is_inference() and not torch.is_inference_mode_enabled():
        fail(f"{name}: expected a tensor that may be written here: an inference tensor (made under "
             "torch.inference_mode()) is written in place only inside inference mode, as torch's in-place ops refuse")
    span = _byte_span(dst)
    if span is None:
        return
    if not dense and torch._debug_has_internal_overlap(dst) != 0 and not _strides_separate(dst):
        fail(f"{name}: expected a tensor whose elements do not overlap each other, got strides {tuple(dst.stride())}")
    for other_name, other in inputs:
        other_span = _byte_span(other)
        if other_span is not None and other_span[0] < span[1] and span[0] < other_span[1]:
            fail(f"{name}: expected memory that does not overlap {other_name} (the op reads {other_name} while "
                  "it writes dst); pass a separate tensor")


def check_bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then):
    check_bypass_align(h_rest, group, merged_now, merged_then)
    B, R, d = h_rest.shape
    check_rank("dst", dst, 3, "[B, M, d]")
    _same("dst", dst, "h_rest", h_rest)
    if dst.shape[0] != B or dst.shape[2] != d:
        fail(f"dst: expected shape [{B}, M, {d}], got {tuple(dst.shape)}")
    check_rank("rows", rows, 2, "[B, R]")
    if rows.dtype not in INT_DTYPES:
        fail(f"rows: expected dtype int64 or int32, got {rows.dtype}")
    _same("rows", rows, "h_rest", h_rest, dtype=False)
    if tuple(rows.shape) != (B, R):
        fail(f"rows: expected shape [{B}, {R}] ([B, R], one destination row per rest token), got {tuple(rows.shape)}")
    _writable("dst", dst, (("rows", rows), ("h_rest", h_rest), ("group", group), ("merged_now", merged_now),
                           ("merged_then", merged_then)))
    if rows.numel() and _read_values(rows):
        lo, hi = _min_max(rows)
        if lo < -1 or hi >= dst.shape[1]:
            fail(f"rows: expected row indices in [0, {dst.shape[1]}) (dst.shape[1]) or -1 (nothing written), "
                  f"got values in [{lo}, {hi}]")


def _index(name, t, ref_name, ref, shape, layout):
    """An int32 / int64 tensor of `shape` on ref's device."""
    check_rank(name, t, len(shape), layout)
    if t.dtype not in INT_DTYPES:
        fail(f"{name}: expected dtype int64 or int32, got {t.dtype}")
    _same(name, t, ref_name, ref, dtype=False)
    if tuple(t.shape) != tuple(shape):
        fail(f"{name}: expected shape {list(shape)} {layout}, got {list(t.shape)}")


def _in_range(name, t, lo, hi, what):
    """Values of t (a tensor, or a numpy array of readable values) in [lo, hi) when they may be read."""
    if t.size if isinstance(t, np.ndarray) else (t.numel() and _read_values(t)):
        low, high = _min_max(t)
        if low < lo or high >= hi:
            fail(f"{name}: expected {what} in [{lo}, {hi}), got values in [{low}, {high}]")


def check_compact(h, vis_start, keep_idx, rest_idx, num_merged):
    check_rank("h", h, 3, "[B, n, d]")
    _float("h", h)
    B, n, _ = h.shape
    _index("vis_start", vis_start, "h", h, (B,), "([B], one start per sample)")
    check_rank("keep_idx", keep_idx, 2, "[B, k]")
    check_rank("rest_idx", rest_idx, 2, "[B, R]")
    k, R = keep_idx.shape[1], rest_idx.shape[1]
    _index("keep_idx", keep_idx, "h", h, (B, k), "([B, k], kept block slots)")
    _index("rest_idx", rest_idx, "h", h, (B, R), "([B, R], rest block slots)")
    M = k + R
    if M > n:
        fail(f"keep_idx, rest_idx: expected k + R <= n = {n} (the visual block lies in the sequence), "
              f"got k + R = {M}")
    check_int("num_merged", num_merged, 0, R, "the number of merged tokens Z, in [0, R]")
    if B and _read_values(vis_start):
        lo, hi = _min_max(vis_start)
        if lo < 0 or hi + M > n:
            fail(f"vis_start: expected 0 <= vis_start[b] and vis_start[b] + k + R <= n = {n} "
                  f"(k + R = {M}), got values in [{lo}, {hi}]")
    if B and M and _read_values(keep_idx):
        keep, rest = _host(keep_idx), _host(rest_idx)
        slots = np.concatenate([keep, rest], 1)
        _in_range("keep_idx, rest_idx", slots, 0, M, "block slots")
        # B M slots in [0, M): each sample's slots 0..M-1 exactly once iff none is missing
        seen = np.bincount((slots + np.arange(0, B * M, M)[:, None] if B > 1 else slots).ravel(), minlength=B * M)
        if seen.min() == 0:
            fail(f"keep_idx, rest_idx: expected the slots 0..{M - 1} of each sample's block exactly once "
                  "(a partition, as score_select returns)")
        for name, t in (("keep_idx", keep), ("rest_idx", rest)):
            if t.shape[1] > 1 and not (t[:, 1:] > t[:, :-1]).all():
                fail(f"{name}: expected ascending slots in each row (as score_select returns them)")


def check_compact_ragged(h, vis_start, keep_idx, rest_idx, num_merged, max_merged=None):
    check_rank("h", h, 3, "[B, n, d]")
    _float("h", h)
    B, n, _ = h.shape
    _index("vis_start", vis_start, "h", h, (B,), "([B], one start per sample)")
    check_rank("keep_idx", keep_idx, 2, "[B, K]")
    check_rank("rest_idx", rest_idx, 2, "[B, M]")
    K, M = keep_idx.shape[1], rest_idx.shape[1]
    _index("keep_idx", keep_idx, "h", h, (B, K), "([B, K], kept block slots, then -1)")
    _index("rest_idx", rest_idx, "h", h, (B, M), "([B, M], rest block slots, then -1; M: the block's width)")
    if K > M or M > n:
        fail(f"keep_idx, rest_idx: expected K <= M <= n = {n} (rest_idx is as wide as the visual block, as "
              f"score_select.ragged returns it), got K = {K}, M = {M}")
    _counts("num_merged", num_merged, B, "h", h, "the number of merged tokens")
    _width_int("max_merged", max_merged, 0, M, "the padded width of merged_rows, in [0, M]")
    _per_sample("num_merged", num_merged, 0, max_merged, "at most max_merged")
    if B and _read_values(vis_start):
        lo, hi = _min_max(vis_start)
        if lo < 0 or hi + M > n:
            fail(f"vis_start: expected 0 <= vis_start[b] and vis_start[b] + M <= n = {n} (M = {M}), "
                  f"got values in [{lo}, {hi}]")
    if B and M and _read_values(keep_idx) and _read_values(rest_idx):
        keep, rest = _host(keep_idx), _host(rest_idx)
        for name, t in (("keep_idx", keep), ("rest_idx", rest)):
            _in_range(name, t, -1, M, "block slots (-1: padding)")
            valid = t >= 0
            if t.shape[1] > 1 and not (((t[:, 1:] > t[:, :-1]) | ~valid[:, 1:]).all() and
                                       (valid[:, :-1] | ~valid[:, 1:]).all()):
                fail(f"{name}: expected each row's slots ascending, then -1 (as score_select.ragged returns them)")
        # per sample, how often each slot occurs (padding -1 counted in column M)
        flat = np.concatenate([keep, rest], 1) % (M + 1) + np.arange(0, B * (M + 1), M + 1)[:, None]
        seen = np.bincount(flat.ravel(), minlength=B * (M + 1)).reshape(B, M + 1)
        if (seen[:, :M] > 1).any():
            fail("keep_idx, rest_idx: expected each block slot at most once in a sample (kept or rest)")
        # a sample of m_b = k_b + r_b slots partitions exactly its first m_b slots 0..m_b - 1 (no gap)
        m_b = (keep >= 0).sum(1) + (rest >= 0).sum(1)
        if not np.array_equal(seen[:, :M] > 0, np.arange(M)[None, :] < m_b[:, None]):
            fail("keep_idx, rest_idx: expected each sample's kept and rest slots to partition its block's first "
                 "k_b + r_b slots 0..k_b + r_b - 1 (no gap), as score_select.ragged returns them")
        if _read_values(num_merged):
            _per_sample("num_merged", num_merged, 0, (rest >= 0).sum(1), "at most the sample's rest tokens")


def check_restore(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then):
    check_rank("h", h, 3, "[B, n', d]")
    _float("h", h)
    B, n_cur, d = h.shape
    check_rank("inverse", inverse, 2, "[B, n]")
    n = inverse.shape[1]
    _index("inverse", inverse, "h", h, (B, n), "([B, n], compact's inverse)")
    _index("vis_start", vis_start, "h", h, (B,), "([B], one start per sample)")
    check_rank("rest_idx", rest_idx, 2, "[B, R]")
    R = rest_idx.shape[1]
    _index("rest_idx", rest_idx, "h", h, (B, R), "([B, R], rest block slots)")
    check_rank("h_rest", h_rest, 3, "[B, R, d]")
    _same("h_rest", h_rest, "h", h)
    if tuple(h_rest.shape) != (B, R, d):
        fail(f"h_rest: expected shape [{B}, {R}, {d}] ([B, R, d]), got {list(h_rest.shape)}")
    _index("group", group, "h", h, (B, R), "([B, R], one group id per rest token)")
    check_rank("merged_then", merged_then, 3, "[B, Z, d]")
    _same("merged_then", merged_then, "h", h)
    Z = merged_then.shape[1]
    if merged_then.shape[0] != B or merged_then.shape[2] != d:
        fail(f"merged_then: expected shape [{B}, Z, {d}], got {list(merged_then.shape)}")
    if n_cur == 0 and B and n:
        fail("h: expected at least one row to restore from (n' >= 1)")
    _index("merged_rows", merged_rows, "h", h, (B, Z), "([B, Z], compact's merged_rows)")
    inv = _host(inverse) if _read_values(inverse) else None
    if inv is not None:
        _in_range("inverse", inv, -2, B * n_cur, "flattened rows of h (or -1: restored, -2: ragged block padding)")
    _in_range("merged_rows", merged_rows, 0, B * n_cur, "flattened rows of h")
    # Z = 0 (nothing merged): every rest token comes back unchanged, group's values are not read
    grp = _host(group) if Z and _read_values(group) else None
    if grp is not None and grp.size:
        group_low = _min_max(grp)[0]
        _in_range("group", grp, -1, Z, "group ids (Z = merged_then.shape[1]; -1: ragged padding)")
    if B and _read_values(vis_start):
        lo, hi = _min_max(vis_start)
        if lo < 0:
            fail(f"vis_start: expected values >= 0, got values in [{lo}, {hi}]")
        rest = _host(rest_idx)
        rows = _host(vis_start)[:, None] + rest
        padded = R and rest.min() < 0  # ragged padding entries (-1), or bad ones
        restored = rest >= 0 if padded else slice(None)
        targets = rows[restored] if padded else rows.ravel()  # the rows restored (>= 0: vis_start >= 0 here)
        if padded and rest.min() < -1 or (targets.size and targets.max() >= n):
            _in_range("rest_idx", np.where(rest >= 0, rows, np.where(rest == -1, 0, -1)), 0, n,
                      "rows vis_start[b] + rest_idx[b, i] of the restored sequence (rest_idx -1: ragged padding)")
        if n and inv is not None and _read_values(rest_idx) and (Z == 0 or grp is not None):
            if Z and targets.size and group_low < 0 and grp[restored].min() < 0:
                fail("group: expected a group id >= 0 for every rest entry (-1 only where rest_idx is -1)")
            # how often each row of the restored sequence is restored ([0, n) each: checked above)
            flat = (rows + np.arange(0, B * n, n)[:, None])[restored].ravel() if B > 1 else targets
            times = np.bincount(flat, minlength=B * n)
            if (times.reshape(B, n) != (inv == -1)).any():  # a row restored twice counts 2 != 1 as well
                fail("inverse, rest_idx: expected the rows marked -1 in inverse to be exactly the rows the rest "
                      "entries restore (vis_start + rest_idx), each once")
