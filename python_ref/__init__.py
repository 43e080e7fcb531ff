"""Pure-PyTorch reference implementations of the swiftvlm ops.

These implement docs/semantics.md in plain, vectorised PyTorch (fp32 math for
fp32/fp16/bf16 input, no Python loops over tokens). Every kernel backend is tested against them, and
they serve as the ``torch`` backend of ``torch.ops.swiftvlm.*``.
"""
from .attention_importance import attention_importance
from .bypass_align import bypass_align, bypass_align_into
from .compact import compact
from .group_merge import group_merge, group_targets
from .restore import restore
from .score_select import score_select
from .topk_select import topk_select
from .tv_score import tv_score
from .varlen import score_select_varlen, tv_score_varlen

__all__ = [
    "tv_score",
    "topk_select",
    "score_select",
    "group_merge",
    "group_targets",
    "bypass_align",
    "bypass_align_into",
    "compact",
    "restore",
    "tv_score_varlen",
    "score_select_varlen",
    "attention_importance",
]
