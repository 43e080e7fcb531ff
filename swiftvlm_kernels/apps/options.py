"""Command-line option helpers shared by the subcommands (cli.py, demo.py, evaluation/)."""
from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def backend_name(name: str) -> str:
    """An argparse type: --backend, checked like the ops check it (one of auto, torch, cpu, triton, cuda)."""
    from .._backend import BACKENDS

    if name not in BACKENDS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def require_backend(name, device_type: str) -> None:
    """ValueError saying why when the named backend cannot run on `device_type` tensors here."""
    from .._backend import unavailable_reason

    if name not in (None, "auto"):
        why = unavailable_reason(name, device_type)
        if why is not None:
            raise ValueError(f"--backend {name}: not available on {device_type} tensors here: {why}")
