"""The triton backend: Triton kernels for the swiftvlm ops (the backend protocol of docs/CONTRACT.md).

Runs CUDA tensors, and CPU tensors when TRITON_INTERPRET=1 was set before triton was imported.
Inputs arrive validated for shape, dtype and device; out-of-range values (vis_start, group ids,
rows) are masked or clamped inside the kernels. No function synchronises with the host.
"""
from .attention_importance import attention_importance
from .bypass_align import bypass_align, bypass_align_into
from .compact import compact
from .group_merge import group_merge
from .restore import restore
from .score_select import score_select
from .topk_select import topk_select
from .tv_score import tv_score
from .varlen import score_select_varlen, tv_score_varlen

from ..schemas import OPS

__all__ = list(OPS)  # one function per op (tests/test_backends.py checks every backend has them all)
