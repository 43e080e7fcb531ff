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
from hypothesis import HealthCheck, settings

if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SWIFTVLM_TRITON_GPU_MATH") == "1":
    import triton_gpu_math  # the interpreter computes fp32 exp2, division and sqrt as the GPU does

    triton_gpu_math.install()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

if not torch.cuda.is_available():
    # The test tensors are tiny: OpenMP threads only fight each other over them (and CI has 2 cores).
    torch.set_num_threads(1)


# ---- test tiers (docs/testing.md) -----------------------------------------------------------------
# fast: the default (the README's test command): every test but those marked `slow`, Hypothesis at the
#       "fast" profile. full: everything at the "full" profile. rest: what the fast tier left out
#       (the `slow` tests, and the Hypothesis tests again at the "full" profile): `fast` then `rest`
#       covers the full tier, which is how CI runs it.
TIERS = ("fast", "full", "rest")
_HUNT = os.environ.get("SWIFTVLM_HYPOTHESIS_EXAMPLES")  # set: that many random (not derandomized) examples
_PROFILE = dict(deadline=None, derandomize=_HUNT is None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("fast", max_examples=int(_HUNT or 5), **_PROFILE)
settings.register_profile("full", max_examples=int(_HUNT or 30), **_PROFILE)


def pytest_addoption(parser):
    parser.addoption("--tier", choices=TIERS, default=os.environ.get("SWIFTVLM_TEST_TIER", "fast"),
                     help="fast (default; SWIFTVLM_TEST_TIER sets it): all but the tests marked slow, Hypothesis "
                          "at its fast profile; full: everything; rest: the slow tests and the Hypothesis tests "
                          "at the full profile (fast + rest = full)")


def pytest_configure(config):
    # before the test modules are imported: their @settings objects inherit the profile
    settings.load_profile("fast" if config.getoption("--tier") == "fast" else "full")


def pytest_report_header(config):
    return f"swiftvlm test tier: {config.getoption('--tier')} (Hypothesis profile {settings._current_profile})"


def _is_hypothesis(item) -> bool:
    return getattr(getattr(item, "obj", None), "is_hypothesis_test", False)


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("--tier")
    if tier != "full":
        def wanted(item):
            slow = item.get_closest_marker("slow") is not None
            return not slow if tier == "fast" else slow or _is_hypothesis(item)

        deselected = [item for item in items if not wanted(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if wanted(item)]
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
