"""Tensor-parallel scoring: score_select when each rank holds a slice of the attention heads.

Engines that serve large models (vLLM, SGLang) shard the query / key / value projections over the
ranks of a tensor-parallel group: rank r computes the query heads [r H/W, (r+1) H/W) and the KV
heads they read (sharded when W divides Hkv, replicated when Hkv < W). The score of Eq. 1-2 is the
MEAN over all H heads of each head's softmax, which no rank can compute alone. The tensor-parallel
form (`tp_score_select`):

  1. each rank scores its own heads: tv_score on its q [B, H/W, D] and k [B, Hkv_r, L, D] gives the
     mean over its H/W heads, fp32 [B, N]; times H/W it is their sum (one in-place multiply);
  2. one all_reduce (SUM) of that fp32 [B, N] tensor over the given process group;
  3. divided by H (one in-place divide): the global head mean, then topk_select on every rank.

The softmax of a head runs over all keys, which every rank holds for its own heads (the sequence
is not sharded), so step 1 is exact per head. The all_reduce adds the ranks' partial sums in an
order the backend chooses, and step 1 forms a rank's sum as mean x H/W: the scores equal the
single-rank scores within fp32 rounding (a few ulps), not bit for bit. The SELECTION is identical
on every rank: after the all_reduce every rank holds the same tensor (gloo and NCCL give each rank
the same reduced buffer), and topk_select is deterministic with ties to the lower index, so no
choice depends on the rank. Against one rank with all heads the kept tokens are the same unless two
scores lie within that rounding of each other at the k-th place (the tests check this).

Failing together. Every rank validates all of its arguments (shapes, dtypes, counts, keep, num_heads)
before the first collective. Then, where value checks run (CPU tensors always; GPU tensors with
SWIFTVLM_DEBUG=1 or `check=True`, since it reads one small tensor on the host), one small all_reduce
carries each rank's verdict and a fingerprint of what must be replicated (the shapes, the head count,
the scale, vis_start, the counts, keep and the key mask): if any rank's inputs were refused, or the
ranks disagree, EVERY rank raises a ValueError (a refused rank its own error; the others one naming
the process group). Without that check (GPU tensors, the default: no host sync in the hot path), a
rank whose inputs are refused raises before the collective, and its peers wait in the all_reduce until
the process group's timeout: the `timeout=` the user gives torch.distributed.init_process_group.

group_merge, bypass_align, compact and restore act on hidden states, which tensor parallelism
replicates on every rank (after the row-parallel output projection's all_reduce): they run as they
are, each rank computing the same result. The engine (`PruningEngine(..., process_group=...)`) uses
this form at every stage. Nothing here reads device values on the host: the path stays capturable
in a CUDA graph (NCCL collectives can be captured).
"""
from __future__ import annotations

import struct
from typing import Optional, Union

import torch
from torch import Tensor

from . import _checks, ops

__all__ = ["tp_score_select", "tp_tv_score", "shard_heads"]


def _world(group) -> int:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call "
                         "torch.distributed.init_process_group first)")
    return dist.get_world_size(group)


def _heads(q, num_heads, world: int) -> int:
    """H, the query heads of all ranks, checked against this rank's H_r (q validated first)."""
    local = q.shape[1]
    heads = local * world if num_heads is None else num_heads
    if not isinstance(heads, int) or isinstance(heads, bool) or local < 1 or heads < local or heads % local:
        raise ValueError(f"num_heads: expected a positive multiple of this rank's {local} query heads "
                         f"(the heads of all {world} ranks), got {num_heads!r}")
    return heads


_FINGERPRINT = 8  # int64 words: the same size on every rank, whatever its inputs


def _fingerprint(values, device) -> Tensor:
    """int64 [_FINGERPRINT]: shapes, ints, float bits and position-weighted sums of tensors, folded into
    a fixed number of words (equal inputs give equal fingerprints on every rank; computed on the device,
    nothing read back)."""
    parts = []
    for v in values:
        if isinstance(v, Tensor):
            flat = v.detach().reshape(-1).to(device=device, dtype=torch.int64)
            weights = torch.arange(1, flat.numel() + 1, device=device, dtype=torch.int64) * 1_000_003 + 7
            parts += [torch.tensor([flat.numel()], device=device), (flat * weights).sum().view(1)]
        elif isinstance(v, float):
            parts.append(torch.tensor([struct.unpack("<q", struct.pack("<d", v))[0]], device=device))
        else:
            parts.append(torch.tensor([-1 if v is None else int(v)], device=device, dtype=torch.int64))
    flat = torch.cat(parts + [torch.tensor([len(parts)], device=device)])
    position = torch.arange(flat.numel(), device=device)
    folded = torch.zeros(_FINGERPRINT, dtype=torch.int64, device=device)
    return folded.index_add_(0, position % _FINGERPRINT, flat * (position * 2_654_435_761 + 1))


def _agree(refused: Optional[ValueError], fingerprint: Tensor, group) -> None:
    """One small all_reduce (MAX of [refused, fingerprint, ~fingerprint]: the largest and, bit-inverted,
    the smallest value of each word): every rank raises when any rank's inputs were refused or the
    ranks' fingerprints differ."""
    import torch.distributed as dist

    flag = torch.tensor([int(refused is not None)], device=fingerprint.device, dtype=torch.int64)
    both = torch.cat([flag, fingerprint, torch.bitwise_not(fingerprint)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    reduced = both.tolist()
    if refused is not None:
        raise refused
    n = fingerprint.numel()
    if reduced[0]:
        raise ValueError("process_group: another rank's inputs were refused (its ValueError says why); every rank "
                         "of the tensor-parallel group raises together")
    if reduced[1:1 + n] != [~x for x in reduced[1 + n:]]:
        raise ValueError("vis_start, vis_len, keep, key_mask: the ranks of the process group disagree on the shapes "
                         "(B, L, D, this rank's heads, the widths), the head count, the scale or the replicated inputs "
                         "(vis_start, the counts, keep, key_mask); tensor parallelism needs the same batch on every "
                         "rank")


def _prepared(op: str, args: list, kwargs: dict, num_heads, group, check: Optional[bool], extra=()):
    """Validate a tp call's arguments on this rank before any collective, and, where value checks run
    (or check=True), make the ranks agree (module docstring). Returns (world, H)."""
    world = _world(group)
    refused, heads = None, None
    try:
        ops.prepare(op, list(args), kwargs)
        heads = _heads(args[0], num_heads, world)
    except ValueError as e:
        refused = e
    q = args[0]
    if check is None:
        check = _checks.value_checks_run(q) if isinstance(q, Tensor) else True
    if check:
        device = q.device if isinstance(q, Tensor) else torch.device("cpu")
        shapes = [tuple(a.shape) for a in args if isinstance(a, Tensor)] if refused is None else []
        values = [heads, *[d for shape in shapes for d in shape], *args[2:], *kwargs.values(), *extra]
        _agree(refused, _fingerprint(values, device) if refused is None else
               torch.zeros(_FINGERPRINT, dtype=torch.int64, device=device), group)
    elif refused is not None:
        raise refused
    return world, heads


def _tv_score_all_heads(q, k, vis_start, vis_len, scale, key_mask, heads, group, max_vis_len, backend) -> Tensor:
    import torch.distributed as dist

    scores = ops.tv_score(q, k, vis_start, vis_len, scale, key_mask, max_vis_len=max_vis_len, backend=backend)
    scores.mul_(float(q.shape[1]))  # this rank's heads: their mean x their count = their sum
    dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=group)
    return scores.div_(float(heads))  # the mean over all H heads (Eq. 1)


def tp_tv_score(q: Tensor, k: Tensor, vis_start: Tensor, vis_len: Union[int, Tensor], scale: Optional[float] = None,
                key_mask: Optional[Tensor] = None, *, num_heads: Optional[int] = None, process_group=None,
                max_vis_len: Optional[int] = None, backend: Optional[str] = None,
                check: Optional[bool] = None) -> Tensor:
    """tv_score over the heads of every rank of `process_group`, from this rank's heads.

    Parameters
    ----------
    q : [B, H_r, D] this rank's query heads of the last token (after RoPE).
    k : [B, Hkv_r, L, D] the KV heads those query heads read (query head i reads KV head
        i // (H_r / Hkv_r), the global GQA rule restricted to the rank's slice).
    vis_start, vis_len, scale, key_mask, max_vis_len, backend : as for `ops.tv_score` (vis_len an
        int tensor [B] for a ragged batch).
    num_heads : H, the query heads of all ranks together; default H_r x the group's size.
    process_group : the tensor-parallel group (None: the default group).
    check : make the ranks agree before scoring (module docstring); None: where value checks run
        (CPU tensors, or SWIFTVLM_DEBUG=1).

    Returns
    -------
    fp32 [B, N]: the mean over all H heads of each head's softmax at the visual keys (Eq. 1-2),
    the same tensor on every rank.

    Raises
    ------
    ValueError
        torch.distributed not initialised; num_heads not a positive multiple of H_r; any argument
        `ops.tv_score` refuses; with the check, any rank's refusal or the ranks' disagreement (on
        every rank).
    """
    scale = ops.default_scale(q, scale)
    if isinstance(vis_len, Tensor):
        op, kwargs = "tv_score.ragged", {"max_vis_len": max_vis_len}
    else:
        op, kwargs = "tv_score", {}
    _, heads = _prepared(op, [q, k, vis_start, vis_len, scale, key_mask], kwargs, num_heads, process_group, check)
    return _tv_score_all_heads(q, k, vis_start, vis_len, scale, key_mask, heads, process_group, max_vis_len, backend)


def tp_score_select(q: Tensor, k: Tensor, vis_start: Tensor, vis_len: Union[int, Tensor], keep: Union[int, Tensor],
                    scale: Optional[float] = None, key_mask: Optional[Tensor] = None, *,
                    num_heads: Optional[int] = None, process_group=None, max_vis_len: Optional[int] = None,
                    max_keep: Optional[int] = None, backend: Optional[str] = None,
                    check: Optional[bool] = None) -> tuple[Tensor, Tensor, Tensor]:
    """score_select across the ranks of a tensor-parallel group (module docstring).

    Parameters
    ----------
    q, k, num_heads, process_group, check : as for `tp_tv_score` (this rank's heads).
    vis_start, vis_len, keep, scale, key_mask, max_vis_len, max_keep, backend : as for
        `ops.score_select` (int tensors vis_len / keep [B] for a ragged batch).

    Returns
    -------
    (keep_idx, rest_idx, scores) as `ops.score_select` returns them, identical on every rank.

    Raises
    ------
    ValueError
        as `tp_tv_score` and `ops.score_select`, before any collective.
    """
    scale = ops.default_scale(q, scale)
    ragged = isinstance(vis_len, Tensor) or isinstance(keep, Tensor)
    if ragged:
        B = q.shape[0] if isinstance(q, Tensor) and q.dim() == 3 else 0
        device = q.device if isinstance(q, Tensor) else None
        counts = vis_len if isinstance(vis_len, Tensor) else torch.full((B,), vis_len, dtype=torch.long, device=device)
        keeps = keep if isinstance(keep, Tensor) else torch.full((B,), keep, dtype=torch.long, device=device)
        width = max_vis_len if max_vis_len is not None else (vis_len if isinstance(vis_len, int) else None)
        k_max = max_keep if max_keep is not None else (keep if isinstance(keep, int) else None)
        args = [q, k, vis_start, counts, keeps, scale, key_mask]
        _, heads = _prepared("score_select.ragged", args, {"max_vis_len": width, "max_keep": k_max}, num_heads,
                             process_group, check)
        scores = _tv_score_all_heads(q, k, vis_start, counts, scale, key_mask, heads, process_group, width, backend)
        keep_idx, rest_idx = ops.topk_select(scores, keeps, lengths=counts, max_k=k_max, backend=backend)
    else:
        _, heads = _prepared("score_select", [q, k, vis_start, vis_len, keep, scale, key_mask], {}, num_heads,
                             process_group, check)
        scores = _tv_score_all_heads(q, k, vis_start, vis_len, scale, key_mask, heads, process_group, max_vis_len,
                                     backend)
        keep_idx, rest_idx = ops.topk_select(scores, keep, max_k=max_keep, backend=backend)
    return keep_idx, rest_idx, scores


def shard_heads(q: Tensor, k: Tensor, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """The heads rank `rank` of `world` holds under Megatron-style head sharding: query heads
    [rank H/W, (rank+1) H/W) and the KV heads they read: Hkv/W of them when W divides Hkv, else
    the one KV head (replicated over W/Hkv ranks) that all of them read.

    Parameters
    ----------
    q : [B, H, D]; k : [B, Hkv, L, D]; rank, world : 0 <= rank < world, W dividing H, and either W
        dividing Hkv or Hkv dividing W.

    Returns
    -------
    (q_r [B, H/W, D], k_r [B, Hkv_r, L, D]), views of the inputs.

    Raises
    ------
    ValueError
        a world size that does not shard these heads.
    """
    H, Hkv = q.shape[1], k.shape[1]
    if not (isinstance(world, int) and world >= 1 and H % world == 0
            and (Hkv % world == 0 or world % Hkv == 0)):
        raise ValueError(f"world: expected a size that divides H = {H} and divides or is a multiple of "
                         f"Hkv = {Hkv}, got {world!r}")
    if not (isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"rank: expected 0 <= rank < {world}, got {rank!r}")
    h = H // world
    q_r = q[:, rank * h:(rank + 1) * h]
    if Hkv % world == 0:
        g = Hkv // world
        return q_r, k[:, rank * g:(rank + 1) * g]
    kv = rank * h // (H // Hkv)  # the KV head of the rank's first query head (all of them read it)
    return q_r, k[:, kv:kv + 1]
