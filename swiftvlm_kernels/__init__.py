"""swiftvlm-kernels: kernels for SwiftVLM visual-token pruning with PyTorch bindings.

`import swiftvlm_kernels` registers `torch.ops.swiftvlm.<op>` for every op of `schemas.OPS` (tv_score,
topk_select, score_select, group_merge, bypass_align(_into), compact, restore, the packed
tv_score_varlen / score_select_varlen, attention_importance), with `.ragged` overloads for per-sample
counts. The functions below are the same ops with defaults (scale = D ** -0.5) and a keyword-only
`backend` for one call; `set_backend` and `use_backend` change the default.
"""
from ._backend import BACKENDS, available_backends, set_backend, use_backend
from .ops import (attention_importance, bypass_align, bypass_align_into, compact, group_merge, restore, score_select,
                  score_select_varlen, topk_select, tv_score, tv_score_varlen)

__version__ = "0.1.0"

from .schemas import OPS

__all__ = [
    *OPS,  # the ops' Python wrappers
    "available_backends",
    "set_backend",
    "use_backend",
    "BACKENDS",
    "__version__",
]
