"""Models that run the pruning engine: the minimal LLaVA-1.5 forward (llava.py), its checkpoint
reader (checkpoint.py) and the tiny model with seeded random weights (tiny.py; the trained one is
swiftvlm_kernels.apps.trained)."""
from .llava import LlavaForward, LlavaOutput
from .tiny import tiny_inputs, tiny_llava

__all__ = ["LlavaForward", "LlavaOutput", "tiny_llava", "tiny_inputs"]
