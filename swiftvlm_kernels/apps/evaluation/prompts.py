"""Prompts and model inputs: a word-vocabulary model's prompts (vocab.json, prompt.json: the
embedded model's) or a Hugging Face tokenizer's LLaVA-1.5 template, answers normalised for
comparison, and the batches (left-padded ids, CLIP-normalised pixels) a model reads."""
from __future__ import annotations

import string
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..trained import SPECIAL_WORDS
from .data import IMAGE_PLACEHOLDER, ImageFile, Item, resize

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
        missing = [w for w in SPECIAL_WORDS if w not in self.index]
        if missing:
            raise ValueError(f"vocab: expected the words {' and '.join(SPECIAL_WORDS)}, missing {', '.join(missing)}")
        self.image_token_id = image_token_id
        self.one_token = True

    def words(self, question: str) -> list[str]:
        for p in _PUNCT:
            question = question.replace(p, " ")
        return question.lower().split()

    def ids(self, question: str, n_image: int) -> list[int]:
        bos, unk = self.index["<bos>"], self.index["<unk>"]
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
        before, after = (part.format(question=question) for part in self.TEMPLATE.split(IMAGE_PLACEHOLDER))
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
            raise ValueError(f"--model: {model_dir or 'the embedded model'}/vocab.json has {len(vocab)} words, more than "
                             f"the model's vocabulary")
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


def pixels(images: Sequence[Union[Tensor, ImageFile]], size: int, mean=(0.481, 0.458, 0.408),
           std=(0.269, 0.261, 0.276)) -> Tensor:
    """fp32 [B, 3, size, size]: uint8 images (or a dataset's ImageFiles, read one at a time through
    its cache) resized (bilinear, antialiased) and CLIP-normalised."""
    x = torch.stack([resize(im, size) for im in images])
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def prompt_ids(item: Item, prompts, model, new_tokens: int = 0) -> list[int]:
    """The item's prompt ids, checked: its question holds no image token (the prompt has exactly the
    model's visual tokens of them), and the prompt and new_tokens generated tokens fit the model's
    max_position_embeddings. ValueError naming the item's file and line (Item.source)."""
    ids = prompts.ids(item.question, model.num_visual_tokens)
    where = f"{item.source}: question" if item.source else "question"
    if ids.count(model.image_token_id) != model.num_visual_tokens:
        raise ValueError(f"{where}: expected no image token (id {model.image_token_id}) among its tokens: the image "
                         f"comes once, {model.num_visual_tokens} tokens")
    limit = model.text_config.max_position_embeddings
    if len(ids) + new_tokens > limit:
        more = f" and --max-new-tokens {new_tokens}" if new_tokens else ""
        raise ValueError(f"{where}: expected a prompt{more} of at most max_position_embeddings = {limit} tokens (the "
                         f"model's context), got {len(ids)} prompt tokens ({model.num_visual_tokens} of the image)")
    return ids


def batch_inputs(items: Sequence[Item], prompts, model, device="cpu", dtype=torch.float32) -> dict:
    """input_ids / attention_mask (left-padded) / pixel_values for the model (prompts checked by
    prompt_ids)."""
    rows = [prompt_ids(it, prompts, model) for it in items]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = True
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "pixel_values": pixels([it.image for it in items], model.image_size).to(device, dtype)}
