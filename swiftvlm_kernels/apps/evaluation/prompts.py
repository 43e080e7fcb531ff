"""Prompts and model inputs: a word-vocabulary model's prompts (vocab.json, prompt.json: the
embedded model's) or a Hugging Face tokenizer's LLaVA-1.5 template, answers normalised for
comparison, and the batches (left-padded ids, CLIP-normalised pixels) a model reads."""
from __future__ import annotations

import string
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .data import Item

_PUNCT = "?!.,;:"


def normalise(text: str) -> str:
    """An answer for comparison: its first line, lower-cased, stripped of surrounding spaces and
    final punctuation."""
    first = text.strip().split("\n")[0].strip().lower()
    return first.rstrip(string.punctuation + " ").strip()


class WordPrompts:
    """Prompts of a word-vocabulary model (vocab.json: the embedded model's): <bos>, the question's
    words when question_first (prompt.json), the image tokens, the question's words; words
    lower-cased, punctuation dropped as in training, unknown words <unk>. One-token answers."""

    def __init__(self, vocab: Sequence[str], image_token_id: int, question_first: bool = False):
        self.question_first = question_first
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.image_token_id = image_token_id
        self.one_token = True

    def words(self, question: str) -> list[str]:
        for p in _PUNCT:
            question = question.replace(p, " ")
        return question.lower().split()

    def ids(self, question: str, n_image: int) -> list[int]:
        bos, unk = self.index.get("<bos>", 0), self.index.get("<unk>", 0)
        words = [self.index.get(w, unk) for w in self.words(question)]
        return [bos] + (words if self.question_first else []) + [self.image_token_id] * n_image + words

    def answer_id(self, answer: str) -> int:
        return self.index.get(normalise(answer), -1)  # -1: never predicted (an answer outside the vocabulary)

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] if 0 <= i < len(self.vocab) else "<image>" for i in ids)


class TokenizerPrompts:
    """Prompts of a Hugging Face tokenizer model: the LLaVA-1.5 template with the image token
    expanded to the model's visual tokens; answers generated."""

    TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

    def __init__(self, tokenizer, image_token_id: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.one_token = False

    def ids(self, question: str, n_image: int) -> list[int]:
        before, after = self.TEMPLATE.format(question=question).split("<image>")
        head = self.tokenizer(before, add_special_tokens=True)["input_ids"]
        tail = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        return list(head) + [self.image_token_id] * n_image + list(tail)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.image_token_id], skip_special_tokens=True)


def prompts_for(model_dir: Optional[Path], model):
    """WordPrompts from vocab.json (the embedded model when model_dir is None), else the
    directory's tokenizer."""
    from ..trained import trained_prompt, trained_vocab

    if model_dir is None or (model_dir / "vocab.json").is_file():
        vocab = trained_vocab(model_dir)
        if len(vocab) > model.language_model.embed_tokens.num_embeddings:
            raise ValueError(f"--model: vocab.json has {len(vocab)} words, more than the model's vocabulary")
        return WordPrompts(vocab, model.image_token_id, trained_prompt(model_dir)["question_first"])
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"--model {model_dir}: no vocab.json, and transformers (for its tokenizer) is not "
                         "installed") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises several types for a missing / bad tokenizer
        raise ValueError(f"--model {model_dir}: no vocab.json and no loadable tokenizer ({e})") from None
    return TokenizerPrompts(tokenizer, model.image_token_id)


def pixels(images: Sequence[Tensor], size: int, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276)) -> Tensor:
    """fp32 [B, 3, size, size]: uint8 images resized (bilinear, antialiased) and CLIP-normalised."""
    out = []
    for im in images:
        x = im.float()[None] / 255
        if tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
        out.append(x[0])
    x = torch.stack(out)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def batch_inputs(items: Sequence[Item], prompts, model, device="cpu", dtype=torch.float32) -> dict:
    """input_ids / attention_mask (left-padded) / pixel_values for the model."""
    rows = [prompts.ids(it.question, model.num_visual_tokens) for it in items]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = True
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "pixel_values": pixels([it.image for it in items], model.image_size).to(device, dtype)}
