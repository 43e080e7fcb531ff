"""Which implementation runs an op.

Backends (modules that implement the backend protocol of docs/CONTRACT.md):
  torch   python_ref, the reference (pure PyTorch; any device)
  cpu     swiftvlm_kernels.cpu: pure PyTorch tuned for CPU tensors (same results as python_ref)
  triton  swiftvlm_kernels.triton_kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  cuda    swiftvlm_kernels.cuda_backend (the compiled extension; CUDA tensors)
  auto    CPU tensors: cpu. CUDA tensors: the first available backend in AUTO_CUDA[op]. Other
          devices: torch.

The ops `torch.ops.swiftvlm.*` dispatch by device key (ops.py): each device's kernel calls the
function this module resolved for it once, on the first call (a dict lookup afterwards). The choice
comes from SWIFTVLM_BACKEND when the package is imported, or from `set_backend` / `use_backend`.
An explicit backend for one call goes through the Python wrappers (`swiftvlm_kernels.<op>(...,
backend="triton")`), for tests and benchmarks.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Optional

from .schemas import OPS

log = logging.getLogger("swiftvlm_kernels")

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")

# Preference per op on CUDA tensors; an unavailable backend is skipped with one log line.
# Not yet measured: no GPU run has timed both kernel backends (bench/gpu_report.sh prints the
# measured table to put here). Until then Triton comes first: its kernels are tested against
# python_ref under the Triton interpreter on every CI run.
AUTO_CUDA = {op: ("triton", "cuda", "torch") for op in OPS}

_MODULES = {"torch": "python_ref", "cpu": "swiftvlm_kernels.cpu", "triton": "swiftvlm_kernels.triton_kernels",
            "cuda": "swiftvlm_kernels.cuda_backend"}

_requested = "auto"
resolved: dict[tuple[str, str], Callable] = {}  # (device type, op) -> function, filled on first use
_logged: set = set()


def requested(backend: Optional[str] = None) -> str:
    """The backend name asked for by the argument, else the current default, validated."""
    name = _requested if backend is None else backend
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} (argument, set_backend or "
                         f"SWIFTVLM_BACKEND), got {name!r}")
    return name.strip().lower()


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """None when backend `name` can run on tensors of `device_type`, else why not."""
    if name == "torch":
        return None
    if name == "cpu":
        return None if device_type == "cpu" else f"the cpu backend runs CPU tensors only, got {device_type} tensors"
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
    raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")


def module(op: str, device_type: str, backend: Optional[str] = None) -> ModuleType:
    """The backend module that runs `op` on tensors of `device_type`; RuntimeError saying why
    when an explicitly named backend cannot run there."""
    name = requested(backend)
    if name == "auto":
        choices = AUTO_CUDA[op] if device_type == "cuda" else ("cpu",) if device_type == "cpu" else ("torch",)
        for choice in choices:
            why = unavailable_reason(choice, device_type)
            if why is None:
                return importlib.import_module(_MODULES[choice])
            if (choice, op) not in _logged:
                _logged.add((choice, op))
                log.warning("swiftvlm: %s falls back from the %s backend: %s", op, choice, why)
        return importlib.import_module(_MODULES["torch"])
    why = unavailable_reason(name, device_type)
    if why is not None:
        raise RuntimeError(f"swiftvlm.{op}: backend {name!r} is not available: {why}")
    return importlib.import_module(_MODULES[name])


def default(op: str, device_type: str) -> Callable:
    """The function the op's kernel for `device_type` runs: resolved once, then a dict lookup."""
    fn = resolved.get((device_type, op))
    if fn is None:
        fn = resolved[(device_type, op)] = getattr(module(op, device_type), op)
    return fn


def set_backend(name: Optional[str] = None) -> str:
    """Make `name` ("auto", "torch", "cpu", "triton" or "cuda") the backend of every
    `torch.ops.swiftvlm` call from now on; None re-reads SWIFTVLM_BACKEND (default "auto").
    Returns the previous name."""
    global _requested
    previous = _requested
    _requested = requested(os.environ.get("SWIFTVLM_BACKEND", "auto") if name is None else name)
    resolved.clear()
    return previous


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with use_backend("triton"): ...` runs the block's torch.ops.swiftvlm calls on that backend."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def available_backends(device_type: str) -> list[str]:
    """Names of the concrete backends that can run on `device_type` tensors here."""
    return [n for n in ("torch", "cpu", "triton", "cuda") if unavailable_reason(n, device_type) is None]


set_backend()
