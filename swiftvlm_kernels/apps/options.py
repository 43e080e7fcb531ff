"""Command-line option helpers shared by the subcommands (cli.py, demo.py, evaluation/)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional, Union


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


def shown_path(path: Union[str, Path], cwd: Optional[Path] = None) -> str:
    """`path` as the user can open it from where they stand: relative to the current directory
    (`cwd`) when it lies under it, else absolute."""
    full = Path(path).resolve()
    here = (cwd or Path.cwd()).resolve()
    try:
        return str(full.relative_to(here))
    except ValueError:
        return str(full)


def share(text: str) -> float:
    """An argparse type: a share of the visual tokens in (0, 1], as eval's --budgets take them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share of the visual tokens in (0, 1] such as 0.333, "
                                         f"got {text!r}") from None
    if not 0 < value <= 1:  # NaN too
        hint = " (a share, not a token count)" if value > 1 else ""
        raise argparse.ArgumentTypeError(f"expected a share of the visual tokens in (0, 1] such as 0.333{hint}, "
                                         f"got {text!r}")
    return value
