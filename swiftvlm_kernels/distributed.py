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

group_merge, bypass_align, compact and restore act on hidden states, which tensor parallelism
replicates on every rank (after the row-parallel output projection's all_reduce): they run as they
are, each rank computing the same result. The engine (`PruningEngine(..., process_group=...)`) uses
this form at every stage. Nothing here reads device values on the host: the path stays capturable
in a CUDA graph (NCCL collectives can be captured).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import ops

__all__ = ["tp_score_select", "tp_tv_score", "shard_heads"]


def _world(group) -> int:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call "
                         "torch.distributed.init_process_group first)")
    return dist.get_world_size(group)


def tp_tv_score(q: Tensor, k: Tensor, vis_start: Tensor, vis_len: Union[int, Tensor], scale: Optional[float] = None,
                key_mask: Optional[Tensor] = None, *, num_heads: Optional[int] = None, process_group=None,
                max_vis_len: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
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

    Returns
    -------
    fp32 [B, N]: the mean over all H heads of each head's softmax at the visual keys (Eq. 1-2),
    the same tensor on every rank.

    Raises
    ------
    ValueError
        torch.distributed not initialised; num_heads not a positive multiple of H_r.
    """
    import torch.distributed as dist

    world = _world(process_group)
    scores = ops.tv_score(q, k, vis_start, vis_len, scale, key_mask, max_vis_len=max_vis_len, backend=backend)
    local = q.shape[1]  # q is a valid [B, H_r, D] once tv_score has checked it
    heads = local * world if num_heads is None else num_heads
    if not isinstance(heads, int) or isinstance(heads, bool) or local < 1 or heads < local or heads % local:
        raise ValueError(f"num_heads: expected a positive multiple of this rank's {local} query heads "
                         f"(the heads of all {world} ranks), got {num_heads!r}")
    scores.mul_(float(local))  # this rank's heads: their mean x their count = their sum
    dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=process_group)
    return scores.div_(float(heads))  # the mean over all H heads (Eq. 1)


def tp_score_select(q: Tensor, k: Tensor, vis_start: Tensor, vis_len: Union[int, Tensor], keep: Union[int, Tensor],
                    scale: Optional[float] = None, key_mask: Optional[Tensor] = None, *,
                    num_heads: Optional[int] = None, process_group=None, max_vis_len: Optional[int] = None,
                    max_keep: Optional[int] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """score_select across the ranks of a tensor-parallel group (module docstring).

    Parameters
    ----------
    q, k, num_heads, process_group : as for `tp_tv_score` (this rank's heads).
    vis_start, vis_len, keep, scale, key_mask, max_vis_len, max_keep, backend : as for
        `ops.score_select` (int tensors vis_len / keep [B] for a ragged batch).

    Returns
    -------
    (keep_idx, rest_idx, scores) as `ops.score_select` returns them, identical on every rank.

    Raises
    ------
    ValueError
        as `tp_tv_score` and `ops.topk_select`.
    """
    ragged = isinstance(vis_len, Tensor) or isinstance(keep, Tensor)
    if ragged:
        counts = vis_len if isinstance(vis_len, Tensor) else torch.full((q.shape[0],), vis_len, dtype=torch.long,
                                                                       device=q.device)
        width = max_vis_len if max_vis_len is not None else (vis_len if isinstance(vis_len, int) else None)
        scores = tp_tv_score(q, k, vis_start, counts, scale, key_mask, num_heads=num_heads,
                             process_group=process_group, max_vis_len=width, backend=backend)
        k_max = max_keep if max_keep is not None else (keep if isinstance(keep, int) else None)
        keep_idx, rest_idx = ops.topk_select(scores, keep, lengths=counts, max_k=k_max, backend=backend)
    else:
        scores = tp_tv_score(q, k, vis_start, vis_len, scale, key_mask, num_heads=num_heads,
                             process_group=process_group, max_vis_len=max_vis_len, backend=backend)
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
