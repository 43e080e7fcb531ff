"""Which implementation runs an op: the `backend` argument, else SWIFTVLM_BACKEND, else "auto".

  torch   python_ref (pure PyTorch; any device)
  triton  swiftvlm_kernels.triton_kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  cuda    swiftvlm_kernels.cuda_backend (the compiled extension; CUDA tensors)
  auto    CPU tensors: torch. CUDA tensors: the first available backend in AUTO_CUDA[op].
"""
import importlib
import logging
import os

log = logging.getLogger("swiftvlm_kernels")

BACKENDS = ("auto", "torch", "triton", "cuda")

# Preference per op on CUDA tensors; an unavailable backend is skipped with one log line.
# Not yet measured: no GPU run has timed both kernel backends (bench/gpu_report.sh prints the
# measured table to put here). Until then Triton comes first, because its kernels are tested
# against python_ref under the Triton interpreter on every CI run, while the CUDA kernels are
# compile-checked only.
AUTO_CUDA = {
    "tv_score": ("triton", "cuda", "torch"),
    "topk_select": ("triton", "cuda", "torch"),
    "score_select": ("triton", "cuda", "torch"),
    "group_merge": ("triton", "cuda", "torch"),
    "bypass_align": ("triton", "cuda", "torch"),
    "bypass_align_into": ("triton", "cuda", "torch"),
}

_MODULES = {"torch": "python_ref", "triton": "swiftvlm_kernels.triton_kernels", "cuda": "swiftvlm_kernels.cuda_backend"}
_logged = set()


def requested(backend=None):
    """The backend name asked for by the argument or the environment, validated."""
    name = backend if backend is not None else os.environ.get("SWIFTVLM_BACKEND", "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} (argument or SWIFTVLM_BACKEND), got {name!r}")
    return name


def unavailable_reason(name, device_type):
    """None when backend `name` can run on tensors of `device_type`, else why not."""
    if name == "torch":
        return None
    if name == "triton":
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the triton backend runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
        if device_type not in ("cpu", "cuda"):
            return f"the triton backend does not run on {device_type} tensors"
        try:
            importlib.import_module(_MODULES["triton"])
        except ImportError as e:
            return f"triton is not importable ({e})"
        return None
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device_type} tensors"
        try:
            cuda_backend = importlib.import_module(_MODULES["cuda"])
        except ImportError as e:
            return f"the CUDA extension module is not importable ({e})"
        return None if cuda_backend.available() else cuda_backend.reason
    raise ValueError(name)


def resolve(op, device, backend=None):
    """The backend module that runs `op` on tensors of `device`."""
    name = requested(backend)
    if name == "auto":
        choices = AUTO_CUDA[op] if device.type == "cuda" else ("torch",)
        for choice in choices:
            why = unavailable_reason(choice, device.type)
            if why is None:
                return importlib.import_module(_MODULES[choice])
            if (choice, op) not in _logged:
                _logged.add((choice, op))
                log.warning("swiftvlm: %s falls back from the %s backend: %s", op, choice, why)
        raise AssertionError("the torch backend is always available")
    why = unavailable_reason(name, device.type)
    if why is not None:
        raise RuntimeError(f"swiftvlm.{op}: backend {name!r} is not available: {why}")
    return importlib.import_module(_MODULES[name])


def available_backends(device_type):
    """Names of the concrete backends that can run on `device_type` tensors here."""
    return [n for n in ("torch", "triton", "cuda") if unavailable_reason(n, device_type) is None]
