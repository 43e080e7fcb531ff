"""Visual-token pruning: the plans (SwiftVLM, FastV, PDrop, ALVTS and the budget rule), the engine that
runs a plan inside any decoder loop, prefill FLOPs (Eq. 17-19), pruning-layer selection (Sec. 3.2)
and ALVTS' selectors (`selector.py`). Layers are numbered from 1, as in the paper.

For the models that run it (the minimal LLaVA forward, the transformers path): the decoder loop with
its stages, the rotate-half RoPE and a stage's scoring inputs (`loop.py`), and the visual-span checks
and ragged layout of a prefill's inputs (`layout.py`). This package imports no model and no
integration (models/, hf/ import it)."""
from .engine import PruningEngine, Sequence
from .flops import PrefillFlops, layer_flops, prefill_flops
from .plan import ALVTS, METHODS, FastV, PDrop, PruningPlan, RaggedPlan, Stage, SwiftVLM
from .selection import layer_profile, select_pruning_layers
from .selector import Selector

__all__ = ["SwiftVLM", "FastV", "PDrop", "ALVTS", "PruningPlan", "RaggedPlan", "Stage", "METHODS", "PruningEngine",
           "Sequence", "Selector", "prefill_flops", "layer_flops", "PrefillFlops", "layer_profile",
           "select_pruning_layers"]
