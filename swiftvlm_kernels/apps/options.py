"""Command-line option helpers shared by the subcommands (cli.py, demo.py, evaluation/)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional


def bounded_int(low: int, high: Optional[int] = None, note: str = "", name: str = "int") -> Callable[[str], int]:
    """An argparse type: an int in [low, high] (high None: no bound); `note` ends the error message,
    `name` is what argparse calls the type when the text is no int."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an int {span}{note}, got {value}")
        return value

    parse.__name__ = name
    return parse


positive = bounded_int(1, name="positive")  # an int >= 1


def layer_list(text: str) -> tuple[int, ...]:
    """An argparse type's part: layers L1:L2:... as ints."""
    try:
        return tuple(int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integer layers, got {text!r}") from None


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


def add_model_and_data(parser: argparse.ArgumentParser, data_default: str) -> None:
    """--model and --data, as eval and calibrate take them (a checkpoint and a dataset folder)."""
    parser.add_argument("--model", type=Path, default=None,
                        help="an llava-hf checkpoint directory (default: the embedded trained tiny LLaVA)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"a dataset folder with questions.jsonl (default: {data_default})")
