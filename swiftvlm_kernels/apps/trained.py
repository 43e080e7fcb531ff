"""The embedded tiny LLaVA trained on the synthetic VQA task (swiftvlm_kernels.apps.synth) by
tools/train_tiny.py: its weights (weights/tiny-vqa/: config.json, model.safetensors, vocab.json,
prompt.json, train.json), its calibrated ALVTS selector (weights/tiny-vqa/alvts-selector/, made by
`python -m swiftvlm_kernels calibrate`, the command in the README) and the readers of a
word-vocabulary checkpoint's files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..models.llava import LlavaForward
from ..pruning.selector import Selector
from .untrusted import read_json

TRAINED_DIR = Path(__file__).resolve().parent / "weights" / "tiny-vqa"
SPECIAL_WORDS = ("<bos>", "<unk>")  # the words a word-vocabulary prompt is built with
SELECTOR_DIR = "alvts-selector"  # a checkpoint directory's ALVTS selector, when it has one


def trained_vocab(path=None) -> tuple:
    """The word vocabulary (vocab.json) of a word-vocabulary checkpoint (default: the embedded
    trained tiny LLaVA's): token id = index; validated (a JSON list of distinct non-empty strings,
    at most 1 MiB, holding the special words the prompts are built with: SPECIAL_WORDS)."""
    path = Path(TRAINED_DIR if path is None else path) / "vocab.json"
    if not path.is_file():
        raise ValueError(f"vocab.json: expected a file at {path}")
    words = read_json(path, 1 << 20)
    if not (isinstance(words, list) and words and all(isinstance(w, str) and w for w in words)
            and len(set(words)) == len(words)):
        raise ValueError(f"{path}: expected a JSON list of distinct non-empty strings")
    missing = [w for w in SPECIAL_WORDS if w not in words]
    if missing:
        raise ValueError(f"{path}: expected the words {' and '.join(SPECIAL_WORDS)} (the prompts start with <bos> "
                         f"and spell unknown words <unk>), missing {', '.join(missing)}")
    return tuple(words)


def trained_prompt(path=None) -> dict:
    """prompt.json of a word-vocabulary checkpoint (default: the embedded one): {"question_first":
    bool}, whether the prompt holds the question before the image too. Absent: {"question_first": False}."""
    path = Path(TRAINED_DIR if path is None else path) / "prompt.json"
    if not path.is_file():
        return {"question_first": False}
    doc = read_json(path, 1 << 16)
    if not (isinstance(doc, dict) and isinstance(doc.get("question_first"), bool)):
        raise ValueError(f"{path}: expected a JSON object with a bool question_first")
    return {"question_first": doc["question_first"]}


def trained_record(path=None) -> dict:
    """train.json of a checkpoint trained by tools/train_tiny.py (default: the embedded one): the
    training settings and the recorded held-out accuracy."""
    path = Path(TRAINED_DIR if path is None else path) / "train.json"
    if not path.is_file():
        raise ValueError(f"train.json: expected a file at {path}")
    return read_json(path, 1 << 20)


def checkpoint_selector(path=None) -> Optional[Selector]:
    """The ALVTS selector a checkpoint directory ships (its alvts-selector/, `Selector.load`; default:
    the embedded model's, calibrated), or None when it has none (ALVTS then runs the SVD default)."""
    where = Path(TRAINED_DIR if path is None else path) / SELECTOR_DIR
    return Selector.load(where) if where.is_dir() else None


def trained_tiny_llava(dtype=torch.float32, device="cpu") -> LlavaForward:
    """The embedded tiny LLaVA trained on the synthetic VQA task (swiftvlm_kernels.apps.synth), loaded
    from the package's safetensors (tools/train_tiny.py made it; train.json holds its record)."""
    if not (TRAINED_DIR / "model.safetensors").is_file():
        raise ValueError(f"the trained tiny LLaVA: expected {TRAINED_DIR / 'model.safetensors'} (the package data "
                         "is missing; reinstall swiftvlm_kernels)")
    return LlavaForward.from_pretrained(TRAINED_DIR, dtype, device)

