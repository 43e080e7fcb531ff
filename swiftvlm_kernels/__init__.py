"""swiftvlm-kernels: kernels for SwiftVLM visual-token pruning with PyTorch bindings.

`import swiftvlm_kernels` registers `torch.ops.swiftvlm.{tv_score, topk_select, score_select,
group_merge, bypass_align, bypass_align_into}`. The functions below are the same ops with defaults
(scale = D ** -0.5) and a keyword-only `backend` switch.
"""
from ._backend import BACKENDS, available_backends, set_backend, use_backend
from .ops import bypass_align, bypass_align_into, group_merge, score_select, topk_select, tv_score

__version__ = "0.1.0"

__all__ = [
    "tv_score",
    "topk_select",
    "score_select",
    "group_merge",
    "bypass_align",
    "bypass_align_into",
    "available_backends",
    "set_backend",
    "use_backend",
    "BACKENDS",
    "__version__",
]
