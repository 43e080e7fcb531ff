"""The cpu backend: the swiftvlm ops in pure PyTorch, tuned for CPU tensors (the backend protocol
of docs/CONTRACT.md). It computes what python_ref computes, in the same floating-point order where
the selection depends on it, so its selections equal the reference's (tests/test_backends.py):
  - tv_score converts K to fp32 a chunk of heads at a time (no full-size fp32 copy of K, whose
    allocation alone costs more than the scores on a CPU) and keeps the reference's matmul and
    softmax per head;
  - topk_select ranks by one top-k over an exact 64-bit key (value, then index) instead of two
    stable sorts;
  - group_merge sums the groups with index_add_ (the same order as the reference's scatter_add_,
    without its expanded index);
  - bypass_align(_into) gather and write rows with index_select / index_copy_;
  - the packed (varlen) ops unpack the keys to the padded ragged form (python_ref.varlen);
  - compact places rows by arithmetic (no sort) and, like restore, moves them with index_select /
    index_copy_ on flattened rows.
`auto` runs it for CPU tensors; it also runs on any other device (it is plain PyTorch).
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
