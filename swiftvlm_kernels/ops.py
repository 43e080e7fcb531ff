"""The swiftvlm ops: their schemas (schemas.py) registered with kernels by dispatch key, fake (meta)
implementations, and the Python wrappers.

`torch.ops.swiftvlm.<op>` dispatches by the inputs' device key, as torch's own ops do: the CPU
key runs the `cpu` backend (pure PyTorch tuned for CPU), the CUDA key the Triton or the compiled
CUDA kernels, any other device the `torch` reference. Each kernel validates its input (`_checks`,
ValueError naming the argument) and calls the function `_backend` resolved for its device once; no
per-call backend lookup. The compiled CUDA kernels are reached through their own ops
(`swiftvlm::<op>_cuda`, csrc/torch_bindings.cpp) from the CUDA key's kernel, because torch's
stable C ABI cannot raise a ValueError.

The wrappers `swiftvlm_kernels.<op>` are the same ops with `scale` defaulting to D ** -0.5 and a
keyword-only `backend` that runs one call on a named backend (tests and benchmarks).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import _backend, _checks
from .schemas import MUTATED, RAGGED, SCHEMAS, SIGNATURES

_LIB = torch.library.Library("swiftvlm", "DEF")

# A kernel runs its backend function below autograd, as aten's own kernels run: the op is what autograd
# sees (the dispatcher's autograd fallback has already handled it before the device key), so each of
# the function's torch calls would otherwise go through the autograd and ADInplaceOrView keys again for
# nothing (measured: 4 to 13% of a cpu function's time at LLaVA-1.5 batch 1 shapes).
_BelowAutograd = torch._C._AutoDispatchBelowADInplaceOrView

# overload -> its input check, which takes exactly the schema's arguments (schemas.SCHEMAS)
CHECKS: dict[str, Callable[..., None]] = {name: getattr(_checks, "check_" + name.replace(".", "_"))
                                          for name in SCHEMAS}


def _kernel(op: str, check: Callable, device_type: Optional[str]) -> Callable:
    """The kernel of `op` for one device key: validate, then the resolved backend function (a ragged
    overload runs the op's backend function with the padded widths filled in, as trailing arguments).
    device_type None: the catch-all key of the remaining devices, resolved per device."""
    base = op.split(".")[0]
    key, resolved, default = (device_type, base), _backend.resolved, _backend.default

    def kernel(*args):
        check(*args)
        fn = resolved.get(key) or default(base, device_type)
        with _BelowAutograd():
            return fn(*args)

    def any_device(*args):
        check(*args)
        fn = default(base, next(a for a in args if isinstance(a, Tensor)).device.type)
        with _BelowAutograd():
            return fn(*args)

    chosen = kernel if device_type else any_device
    if op in MUTATED:  # below autograd the writes bump no version counter: the op bumps them itself
        at, run = MUTATED[op], chosen

        def chosen(*args):
            out = run(*args)
            torch._C._increment_version(tuple(args[i] for i in at))
            return out

    def ragged(*args, **kwargs):
        return chosen(*_checks.fill_widths(op, args, kwargs))

    return ragged if op in RAGGED else chosen


for _name, _schema in SCHEMAS.items():
    _LIB.define(_schema)
    _LIB.impl(_name, _kernel(_name, CHECKS[_name], "cpu"), "CPU")
    _LIB.impl(_name, _kernel(_name, CHECKS[_name], "cuda"), "CUDA")
    _LIB.impl(_name, _kernel(_name, CHECKS[_name], None), "CompositeExplicitAutograd")


# ---- fake (meta) implementations: output shapes from the arguments alone ----

@torch.library.register_fake("swiftvlm::tv_score")
def _(q, k, vis_start, vis_len, scale, key_mask=None):
    _checks.check_tv_score(q, k, vis_start, vis_len, scale, key_mask)
    return q.new_empty((q.shape[0], vis_len), dtype=torch.float32)


@torch.library.register_fake("swiftvlm::topk_select")
def _(scores, k):
    _checks.check_topk_select(scores, k)
    B, N = scores.shape
    return scores.new_empty((B, k), dtype=torch.int64), scores.new_empty((B, N - k), dtype=torch.int64)


@torch.library.register_fake("swiftvlm::score_select")
def _(q, k, vis_start, vis_len, keep, scale, key_mask=None):
    _checks.check_score_select(q, k, vis_start, vis_len, keep, scale, key_mask)
    B = q.shape[0]
    return (q.new_empty((B, keep), dtype=torch.int64), q.new_empty((B, vis_len - keep), dtype=torch.int64),
            q.new_empty((B, vis_len), dtype=torch.float32))


@torch.library.register_fake("swiftvlm::group_merge")
def _(h, num_groups):
    _checks.check_group_merge(h, num_groups)
    B, R, d = h.shape
    return (h.new_empty((B, num_groups, d)), h.new_empty((B, R), dtype=torch.int64),
            h.new_empty((B, num_groups), dtype=torch.int32))


@torch.library.register_fake("swiftvlm::bypass_align")
def _(h_rest, group, merged_now, merged_then):
    _checks.check_bypass_align(h_rest, group, merged_now, merged_then)
    return h_rest.new_empty(h_rest.shape)


@torch.library.register_fake("swiftvlm::bypass_align_into")
def _(dst, rows, h_rest, group, merged_now, merged_then):
    _checks.check_bypass_align_into(dst, rows, h_rest, group, merged_now, merged_then)


@torch.library.register_fake("swiftvlm::compact")
def _(h, vis_start, keep_idx, rest_idx, num_merged):
    _checks.check_compact(h, vis_start, keep_idx, rest_idx, num_merged)
    B, n, d = h.shape
    R = rest_idx.shape[1]
    n_new = n - R + num_merged
    return (h.new_empty((B, n_new, d)), h.new_empty((B, n_new), dtype=torch.int64), h.new_empty((B, R, d)),
            h.new_empty((B, num_merged), dtype=torch.int64), h.new_empty((B, n), dtype=torch.int64))


@torch.library.register_fake("swiftvlm::restore")
def _(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then):
    _checks.check_restore(h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then)
    return h.new_empty((h.shape[0], inverse.shape[1], h.shape[2]))


def _fake_args(op, args, kwargs):
    """A ragged fake's arguments, checked: the padded widths must be given (under tracing the counts
    have no values)."""
    for name, _, _ in RAGGED[op].counts:
        if kwargs.get(name) is None and not all(_checks.readable(a) for a in args if isinstance(a, Tensor)):
            _checks.fail(f"{name}: expected the padded width (an int) when tracing (torch.compile, export, "
                          "meta tensors): the counts have no values then")
    full = _checks.fill_widths(op, args, kwargs)
    CHECKS[op](*full)
    return full


@torch.library.register_fake("swiftvlm::attention_importance")
def _(q, k, vis_start, vis_len, scale, key_mask=None):
    _checks.check_attention_importance(q, k, vis_start, vis_len, scale, key_mask)
    return (q.new_empty((q.shape[0], vis_len), dtype=torch.float32),
            q.new_empty((q.shape[0], vis_len), dtype=torch.float32))


@torch.library.register_fake("swiftvlm::attention_importance.ragged")
def _(*args, **kwargs):
    q, *_, width = _fake_args("attention_importance.ragged", args, kwargs)
    return (q.new_empty((q.shape[0], width), dtype=torch.float32),
            q.new_empty((q.shape[0], width), dtype=torch.float32))


@torch.library.register_fake("swiftvlm::tv_score.ragged")
def _(*args, **kwargs):
    q, *_, width = _fake_args("tv_score.ragged", args, kwargs)
    return q.new_empty((q.shape[0], width), dtype=torch.float32)


@torch.library.register_fake("swiftvlm::topk_select.ragged")
def _(*args, **kwargs):
    scores, *_, width = _fake_args("topk_select.ragged", args, kwargs)
    B, N = scores.shape
    return scores.new_empty((B, width), dtype=torch.int64), scores.new_empty((B, N), dtype=torch.int64)


@torch.library.register_fake("swiftvlm::score_select.ragged")
def _(*args, **kwargs):
    q, *_, W, K = _fake_args("score_select.ragged", args, kwargs)
    B = q.shape[0]
    return (q.new_empty((B, K), dtype=torch.int64), q.new_empty((B, W), dtype=torch.int64),
            q.new_empty((B, W), dtype=torch.float32))


@torch.library.register_fake("swiftvlm::group_merge.ragged")
def _(*args, **kwargs):
    h, *_, Z = _fake_args("group_merge.ragged", args, kwargs)
    B, R, d = h.shape
    return (h.new_empty((B, Z, d)), h.new_empty((B, R), dtype=torch.int64), h.new_empty((B, Z), dtype=torch.int32))


@torch.library.register_fake("swiftvlm::compact.ragged")
def _(*args, **kwargs):
    h, vis_start, keep_idx, rest_idx, _, Zw = _fake_args("compact.ragged", args, kwargs)
    B, n, d = h.shape
    K, M = keep_idx.shape[1], rest_idx.shape[1]
    n_new = n - M + K + Zw
    return (h.new_empty((B, n_new, d)), h.new_empty((B, n_new), dtype=torch.int64), h.new_empty((B, M, d)),
            h.new_empty((B, Zw), dtype=torch.int64), h.new_empty((B, n), dtype=torch.int64))


@torch.library.register_fake("swiftvlm::tv_score_varlen")
def _(*args, **kwargs):
    q, *_, width, _ = _fake_args("tv_score_varlen", args, kwargs)
    return q.new_empty((q.shape[0], width), dtype=torch.float32)


@torch.library.register_fake("swiftvlm::score_select_varlen")
def _(*args, **kwargs):
    q, *_, W, K, _ = _fake_args("score_select_varlen", args, kwargs)
    B = q.shape[0]
    return (q.new_empty((B, K), dtype=torch.int64), q.new_empty((B, W), dtype=torch.int64),
            q.new_empty((B, W), dtype=torch.float32))


# ---- Python wrappers: the same ops with defaults and a keyword-only backend switch ----

def _python_types(op: str, args) -> None:
    """ValueError naming the argument when a Python value has the wrong type (the dispatcher would
    raise a RuntimeError, and would take a bool for an int)."""
    sig = SIGNATURES[op]
    for (name, kind), value in zip(sig.positional + sig.keyword, args):
        if kind.endswith("?") and value is None:
            continue
        if kind.startswith("Tensor"):
            ok, want = isinstance(value, Tensor), "a torch.Tensor" + (" or None" if kind == "Tensor?" else "")
        elif kind.startswith("SymInt"):
            ok, want = isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool), "an int"
        else:
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a float"
        if not ok:
            _checks.fail(f"{name}: expected {want}, got {type(value).__name__} {value!r}"[:200])


def prepare(op: str, args, kwargs) -> list:
    """The arguments of one call of `op` (an overload name) as a backend function takes them (keyword-only
    ones appended, padded widths filled), validated as the registered kernels validate them."""
    keywords = RAGGED[op].keywords if op in RAGGED else ()
    _python_types(op, tuple(args) + tuple(kwargs.get(n) for n in keywords))
    args = _checks.fill_widths(op, args, kwargs) if keywords else list(args)
    CHECKS[op](*args)
    return args


def _call(op: str, backend: Optional[str], *args, **kwargs):
    """One call of `op` (an overload name such as "tv_score.ragged" included; keyword-only arguments
    in kwargs): torch.ops.swiftvlm (the device's default backend) or the named backend, validated as
    the registered kernels validate."""
    if backend is None:
        keywords = RAGGED[op].keywords if op in RAGGED else ()
        _python_types(op, tuple(args) + tuple(kwargs.get(n) for n in keywords))
        base, _, overload = op.partition(".")
        return getattr(getattr(torch.ops.swiftvlm, base), overload or "default")(*args, **kwargs)
    if torch.compiler.is_compiling():
        _checks.fail(f"backend: a per-call backend ({backend!r}) runs that backend's Python function outside the "
                      "op, which torch.compile cannot trace; choose it with swiftvlm_kernels.set_backend / "
                      "use_backend before compiling and call without backend=")
    full = prepare(op, args, kwargs)
    base = op.split(".")[0]
    device = next(a for a in full if isinstance(a, Tensor)).device
    return getattr(_backend.module(base, device.type, backend), base)(*full)


def _per_sample_counts(name, value, q):
    """An int count as an int tensor [B] on q's device (the varlen and ragged ops take tensors)."""
    if isinstance(value, Tensor):
        return value
    _checks.check_int(name, value, 0, value if isinstance(value, int) and value >= 0 else 0, f"a count ({name})")
    return torch.full((q.shape[0] if isinstance(q, Tensor) and q.dim() == 3 else 0,), value, dtype=torch.int64,
                      device=q.device if isinstance(q, Tensor) else None)


def _no_width(name, value, counts):
    if value is not None:
        _checks.fail(f"{name}: a padded width goes with per-sample counts ({counts} as an int tensor [B]), "
                      f"got {name}={value!r} with an int {counts}")


def default_scale(q, scale):
    """The softmax scale: `scale`, else D ** -0.5 (ValueError naming q when it has no head dim)."""
    if scale is not None:
        return scale
    _checks.check_rank("q", q, 3, "[B, H, D]")
    _checks.at_least_one("q", q.shape[2], "feature per head (q.shape[2], D)")
    return q.shape[2] ** -0.5


def tv_score(q: Tensor, k: Tensor, vis_start: Tensor, vis_len: Union[int, Tensor], scale: Optional[float] = None,
             key_mask: Optional[Tensor] = None, *, max_vis_len: Optional[int] = None,
             backend: Optional[str] = None) -> Tensor:
    """Last-token attention to each visual token, averaged over heads (Eq. 1-2).

    Parameters
    ----------
    q : [B, H, D] query of the last token, after RoPE (fp32, fp16 or bf16).
    k : [B, Hkv, L, D] keys of all tokens, after RoPE; H % Hkv == 0 (GQA).
    vis_start : int32/int64 [B], where each sample's visual span starts.
    vis_len : the number of visual tokens (at most L); or, for a ragged batch, an int tensor [B] of
        each sample's count.
    scale : softmax scale, default D ** -0.5.
    key_mask : bool [B, L], True = valid key; None = all valid.
    max_vis_len : with a tensor vis_len, the padded width of the result (required for GPU tensors,
        computed from vis_len for CPU tensors).
    backend : None (the device's default), or "torch", "cpu", "triton", "cuda" for this call.

    Returns
    -------
    fp32 [B, vis_len], or [B, max_vis_len] with zeros past each sample's vis_len[b].

    Raises
    ------
    ValueError naming the argument for bad shapes, dtypes, devices or values.
    """
    scale = default_scale(q, scale)
    if isinstance(vis_len, Tensor):
        return _call("tv_score.ragged", backend, q, k, vis_start, vis_len, scale, key_mask, max_vis_len=max_vis_len)
    _no_width("max_vis_len", max_vis_len, "vis_len")
    return _call("tv_score", backend, q, k, vis_start, vis_len, scale, key_mask)


def attention_importance(q: Tensor, k: Tensor, vis_start: Tensor, vis_len: Union[int, Tensor],
                         scale: Optional[float] = None, key_mask: Optional[Tensor] = None, *,
                         max_vis_len: Optional[int] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """The attention each visual token receives from the text rows and from the visual rows (ALVTS'
    importance: docs/semantics.md, attention_importance).

    Parameters
    ----------
    q : [B, H, L, E] queries of every row (fp32, fp16 or bf16); E is any width: a low-rank selector's
        rank, or the model's head dim (then after RoPE).
    k : [B, Hk, L, E] keys of every row; H % Hk == 0 (query head h reads key head h // (H / Hk)).
    vis_start : int32/int64 [B], where each sample's visual span starts.
    vis_len : the number of visual tokens; or, for a ragged batch, an int tensor [B] of each sample's.
    scale : softmax scale, default E ** -0.5.
    key_mask : bool [B, L], True = a valid row (a valid key and a valid query row); None = all valid.
    max_vis_len : with a tensor vis_len, the padded width (required for GPU tensors).
    backend : None (the device's default), or "torch", "cpu", "triton", "cuda" for this call.

    Returns
    -------
    (t2v, v2v), fp32 [B, vis_len] (or [B, max_vis_len], 0 past vis_len[b]): per visual token, the mean
    over heads and over the sample's valid text rows (t2v) / valid visual rows (v2v) of the causal
    softmax probability at that key; 0 for a sample without such rows.

    Raises
    ------
    ValueError naming the argument for bad shapes, dtypes, devices or values.
    """
    if scale is None:
        _checks.check_rank("q", q, 4, "[B, H, L, E]")
        _checks.at_least_one("q", q.shape[3], "feature per head (q.shape[3], E)")
        scale = q.shape[3] ** -0.5
    if isinstance(vis_len, Tensor):
        return _call("attention_importance.ragged", backend, q, k, vis_start, vis_len, scale, key_mask,
                     max_vis_len=max_vis_len)
    _no_width("max_vis_len", max_vis_len, "vis_len")
    return _call("attention_importance", backend, q, k, vis_start, vis_len, scale, key_mask)


def topk_select(scores: Tensor, k: Union[int, Tensor], *, lengths: Optional[Tensor] = None,
                max_k: Optional[int] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Split indices 0..N-1 of `scores` into the k best and the others (Eq. 2's top-k).

    Parameters
    ----------
    scores : float [B, N]. Larger is better; NaN ranks below -inf; ties go to the lower index.
    k : how many to keep, 0 <= k <= N; or, for ragged rows, an int tensor [B].
    lengths : ragged rows: int [B], the number of scores of each row (the entries after them are
        padding, never chosen).
    max_k : ragged rows: the padded width of keep (required for GPU tensors).
    backend : None (the device's default), or "torch", "cpu", "triton", "cuda" for this call.

    Returns
    -------
    (keep int64 [B, k], rest int64 [B, N - k]), both ascending. Ragged rows: keep [B, max_k] and
    rest [B, N], each row's indices ascending, then -1.

    Raises
    ------
    ValueError naming the argument: a k outside [0, N], a bad `scores`, lengths or widths.
    """
    if isinstance(k, Tensor) or lengths is not None:
        if not isinstance(k, Tensor):
            _checks.check_int("k", k, 0, scores.shape[1] if isinstance(scores, Tensor) and scores.dim() == 2 else k,
                         "the number of indices to keep")
            max_k = k if max_k is None else max_k
            k = torch.full((scores.shape[0],), k, dtype=torch.int64, device=scores.device)
        return _call("topk_select.ragged", backend, scores, k, lengths=lengths, max_k=max_k)
    _no_width("max_k", max_k, "k")
    return _call("topk_select", backend, scores, k)


def score_select(q: Tensor, k: Tensor, vis_start: Tensor, vis_len: Union[int, Tensor], keep: Union[int, Tensor],
                 scale: Optional[float] = None, key_mask: Optional[Tensor] = None, *,
                 max_vis_len: Optional[int] = None, max_keep: Optional[int] = None,
                 backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """topk_select(tv_score(...), keep) as one op: the entry point other pruning code calls.

    Parameters
    ----------
    q, k, vis_start, vis_len, scale, key_mask : as for `tv_score`.
    keep : how many visual tokens to keep, 0 <= keep <= vis_len; or an int tensor [B] (ragged).
    max_vis_len, max_keep : ragged batches (vis_len and/or keep int tensors [B]; an int is the same
        for every sample): the padded widths (required for GPU tensors).
    backend : None (the device's default), or "torch", "cpu", "triton", "cuda" for this call.

    Returns
    -------
    (keep_idx int64 [B, keep], rest_idx int64 [B, vis_len - keep], scores fp32 [B, vis_len]):
    visual-token indices, ascending. Ragged: keep_idx [B, max_keep], rest_idx and scores
    [B, max_vis_len]; each row's indices ascending then -1, scores 0 past vis_len[b].

    Raises
    ------
    ValueError naming the argument for bad shapes, dtypes, devices or values.
    """
    scale = default_scale(q, scale)
    if isinstance(vis_len, Tensor) or isinstance(keep, Tensor):
        B = q.shape[0] if isinstance(q, Tensor) and q.dim() == 3 else 0
        device = q.device if isinstance(q, Tensor) else None
        if not isinstance(vis_len, Tensor):
            _checks.check_int("vis_len", vis_len, 0, vis_len, "the number of visual tokens")
            max_vis_len = vis_len if max_vis_len is None else max_vis_len
            vis_len = torch.full((B,), vis_len, dtype=torch.int64, device=device)
        if not isinstance(keep, Tensor):
            _checks.check_int("keep", keep, 0, keep, "the number of visual tokens to keep")
            max_keep = keep if max_keep is None else max_keep
            keep = torch.full((B,), keep, dtype=torch.int64, device=device)
        return _call("score_select.ragged", backend, q, k, vis_start, vis_len, keep, scale, key_mask,
                     max_vis_len=max_vis_len, max_keep=max_keep)
    _no_width("max_vis_len", max_vis_len, "vis_len")
    _no_width("max_keep", max_keep, "keep")
    return _call("score_select", backend, q, k, vis_start, vis_len, keep, scale, key_mask)


def group_merge(h: Tensor, num_groups: Union[int, Tensor], *, lengths: Optional[Tensor] = None,
                max_groups: Optional[int] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Group the rest tokens around Z targets by cosine similarity and average each group (Eq. 10-11).

    Parameters
    ----------
    h : [B, R, d] the rest tokens' hidden states, in position order (fp32, fp16 or bf16).
    num_groups : Z, 1 <= Z <= R; or, ragged, an int tensor [B] (1 <= Z_b <= lengths[b]; 0 for an
        empty sample).
    lengths : ragged: int [B], each sample's rest tokens (the rows after them are padding).
    max_groups : ragged: the padded width Z (required for GPU tensors).
    backend : None (the device's default), or "torch", "cpu", "triton", "cuda" for this call.

    Returns
    -------
    (merged [B, Z, d] in h's dtype, group int64 [B, R], counts int32 [B, Z]). Ragged: merged
    [B, max_groups, d] and counts zero past Z_b, group -1 past lengths[b].

    Raises
    ------
    ValueError naming the argument: Z outside [1, R], a bad `h`, lengths or widths.
    """
    if isinstance(num_groups, Tensor) or lengths is not None:
        if not isinstance(num_groups, Tensor):
            _checks.check_int("num_groups", num_groups, 0, num_groups, "the number of groups")
            max_groups = num_groups if max_groups is None else max_groups
            num_groups = torch.full((h.shape[0] if isinstance(h, Tensor) and h.dim() == 3 else 0,), num_groups,
                                    dtype=torch.int64, device=h.device if isinstance(h, Tensor) else None)
        return _call("group_merge.ragged", backend, h, num_groups, lengths=lengths, max_groups=max_groups)
    _no_width("max_groups", max_groups, "num_groups")
    return _call("group_merge", backend, h, num_groups)


def bypass_align(h_rest: Tensor, group: Tensor, merged_now: Tensor, merged_then: Tensor, *,
                 backend: Optional[str] = None) -> Tensor:
    """Restore bypassed tokens: h_rest + merged_now[group] - merged_then[group] (Eq. 12-13).

    Parameters
    ----------
    h_rest : [B, R, d] the rest tokens when set aside.
    group : int64 [B, R], each token's merged token (-1: skipped).
    merged_now, merged_then : [B, Z, d] the merged tokens now and when made.
    backend : None (the device's default), or "torch", "cpu", "triton", "cuda" for this call.

    Returns
    -------
    [B, R, d] in h_rest's dtype (fp32 math).

    Raises
    ------
    ValueError naming the argument for bad shapes, dtypes, devices or group values.
    """
    return _call("bypass_align", backend, h_rest, group, merged_now, merged_then)


def bypass_align_into(dst: Tensor, rows: Tensor, h_rest: Tensor, group: Tensor, merged_now: Tensor,
                      merged_then: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """bypass_align written in place: dst[b, rows[b, i]] = bypass_align(...)[b, i].

    Parameters
    ----------
    dst : [B, n, d] the sequence to write into (must not overlap the other tensors).
    rows : int64 [B, R], each restored token's row in dst (-1: skipped).
    h_rest, group, merged_now, merged_then, backend : as for `bypass_align`.

    Returns
    -------
    dst.

    Raises
    ------
    ValueError naming the argument for bad shapes, dtypes, devices, rows or overlap.
    """
    _call("bypass_align_into", backend, dst, rows, h_rest, group, merged_now, merged_then)
    return dst


def compact(h: Tensor, vis_start: Tensor, keep_idx: Tensor, rest_idx: Tensor, num_merged: Union[int, Tensor], *,
            max_merged: Optional[int] = None, backend: Optional[str] = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rebuild a sequence after a pruning stage in one pass (python_ref/compact.py has the exact
    contract): the visual block of h at vis_start keeps the kept slots and one row per group target
    of the rest (num_merged targets; 0 drops the rest), in position order.

    Parameters
    ----------
    h : [B, n, d] the sequence.
    vis_start : int [B], where each visual block starts.
    keep_idx, rest_idx : score_select's kept and rest slots (ragged: -1 padded [B, K], [B, M]).
    num_merged : Z, the rest's merged tokens (0: drop the rest); ragged: an int tensor [B].
    max_merged : ragged: the padded width Z; each sample's new block is its kept and target rows,
        then zero padding rows up to K + max_merged (python_ref.compact_ragged).
    backend : None (the device's default), or "torch", "cpu", "triton", "cuda" for this call.

    Returns
    -------
    (h_new [B, n - R + Z, d], src int64 [B, n'] flattened source rows, rest_h [B, R, d],
    merged_rows int64 [B, Z] flattened rows of the targets in h_new, inverse int64 [B, n] the
    flattened new row of each kept / text row, -1 for rest rows).

    Raises
    ------
    ValueError naming the argument for bad shapes, dtypes, devices or index values.
    """
    if isinstance(num_merged, Tensor):
        return _call("compact.ragged", backend, h, vis_start, keep_idx, rest_idx, num_merged, max_merged=max_merged)
    _no_width("max_merged", max_merged, "num_merged")
    return _call("compact", backend, h, vis_start, keep_idx, rest_idx, num_merged)


def restore(h: Tensor, inverse: Tensor, vis_start: Tensor, rest_idx: Tensor, h_rest: Tensor, group: Tensor,
            merged_rows: Tensor, merged_then: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Undo `compact` after the layers in between (Eq. 12-13).

    Parameters
    ----------
    h : [B, n', d] the compacted sequence after the layers in between.
    inverse, vis_start, rest_idx, merged_rows : compact's outputs and inputs for that stage.
    h_rest : [B, R, d] the rest tokens when set aside; group : int64 [B, R] their merged tokens.
    merged_then : [B, Z, d] the merged tokens when made. Z = 0 (merged_rows [B, 0]: a stage that
        merged nothing, such as ALVTS' skipped tokens rejoining after their layer): group is not read.
    backend : None (the device's default), or "torch", "cpu", "triton", "cuda" for this call.

    Returns
    -------
    [B, n, d]: every carried row of h back in place, every rest token restored as
    h_rest + h[merged_rows[group]] - merged_then[group] (fp32 math); with Z = 0, h_rest unchanged
    (bit for bit).

    Raises
    ------
    ValueError naming the argument for bad shapes, dtypes, devices or index values.
    """
    return _call("restore", backend, h, inverse, vis_start, rest_idx, h_rest, group, merged_rows, merged_then)


def tv_score_varlen(q: Tensor, k: Tensor, cu_seqlens: Tensor, vis_start: Tensor, vis_len: Union[int, Tensor],
                    scale: Optional[float] = None, *, max_vis_len: Optional[int] = None,
                    max_seqlen: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """tv_score on a packed batch (FlashAttention varlen / vLLM layout, no padding).

    Parameters
    ----------
    q : [B, H, D] each sample's last-token query.
    k : [total, Hkv, D] the keys of all samples concatenated.
    cu_seqlens : int [B + 1]: sample b's keys are rows cu_seqlens[b] .. cu_seqlens[b+1]-1.
    vis_start : int [B] each visual span's start within its sample.
    vis_len : int or int tensor [B]; scale : softmax scale, default D ** -0.5.
    max_vis_len : the padded width (required for GPU tensors with a tensor vis_len).
    max_seqlen : the longest sample (optional: it only sizes the kernels' grids).
    backend : None (the device's default), or "torch", "cpu", "triton", "cuda" for this call.

    Returns
    -------
    fp32 [B, max_vis_len], equal to tv_score on the same samples padded, 0 past vis_len[b].

    Raises
    ------
    ValueError naming the argument for bad shapes, dtypes, devices or values.
    """
    scale = default_scale(q, scale)
    if not isinstance(vis_len, Tensor):
        max_vis_len = vis_len if max_vis_len is None else max_vis_len
    vis_len = _per_sample_counts("vis_len", vis_len, q)
    return _call("tv_score_varlen", backend, q, k, cu_seqlens, vis_start, vis_len, scale, max_vis_len=max_vis_len,
                 max_seqlen=max_seqlen)


def score_select_varlen(q: Tensor, k: Tensor, cu_seqlens: Tensor, vis_start: Tensor, vis_len: Union[int, Tensor],
                        keep: Union[int, Tensor], scale: Optional[float] = None, *, max_vis_len: Optional[int] = None,
                        max_keep: Optional[int] = None, max_seqlen: Optional[int] = None,
                        backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """score_select on a packed batch.

    Parameters
    ----------
    q, k, cu_seqlens, vis_start, vis_len, scale, max_vis_len, max_seqlen, backend : as for
        `tv_score_varlen`.
    keep : an int or int tensor [B]; max_keep : the padded width of keep_idx.

    Returns
    -------
    (keep_idx [B, max_keep], rest_idx [B, max_vis_len], scores fp32 [B, max_vis_len]), each row's
    indices ascending then -1, equal to the padded ragged form on the same samples.

    Raises
    ------
    ValueError naming the argument for bad shapes, dtypes, devices or values.
    """
    scale = default_scale(q, scale)
    if not isinstance(vis_len, Tensor):
        max_vis_len = vis_len if max_vis_len is None else max_vis_len
    if not isinstance(keep, Tensor):
        max_keep = keep if max_keep is None else max_keep
    vis_len, keep = _per_sample_counts("vis_len", vis_len, q), _per_sample_counts("keep", keep, q)
    return _call("score_select_varlen", backend, q, k, cu_seqlens, vis_start, vis_len, keep, scale,
                 max_vis_len=max_vis_len, max_keep=max_keep, max_seqlen=max_seqlen)
