import os

# The Triton interpreter must be chosen before triton is first imported: without a GPU, Triton
# kernels run on CPU tensors through it.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SWIFTVLM_TRITON_GPU_MATH") == "1":
    import triton_gpu_math  # the interpreter computes fp32 exp2, division and sqrt as the GPU does

    triton_gpu_math.install()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

if not torch.cuda.is_available():
    # The test tensors are tiny: OpenMP threads only fight each other over them (and CI has 2 cores).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def train_tiny():
    """tools/train_tiny.py as a module (the training script of the embedded trained tiny LLaVA)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
