"""Where each sample's visual tokens are: the checks of a prefill's input_ids / attention_mask that
pruning needs, and the padded layout of a ragged batch. Shared by the minimal LLaVA forward and the
transformers path (`swiftvlm_kernels.hf`).

Pruning takes left padding only, one contiguous span of image tokens per sample (several images side
by side form one pool of visual tokens), outside the padding and followed by at least one text token
(the last token's query scores the visual tokens). `check_spans` reads input_ids and the mask on the
host, once per call: the only host reads of a pruned prefill.

A ragged batch (samples with different visual-token counts) runs padded: each sample's visual tokens,
then max(counts) - counts[b] padding rows (the block padding, invalid keys), the samples left-padded
to a common length again (`ragged_layout`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class SpanErrors(NamedTuple):
    """A client's wording of the span errors (format fields: b, the sample; n, its image tokens)."""
    left_padding: str
    not_contiguous: str
    ends_with_image: str


def check_spans(ids: Tensor, valid: Tensor, image_token_id: int, errors: SpanErrors, *,
                per_image: Optional[int] = None, text_after: bool = True) -> tuple[list, list]:
    """(counts, starts): each sample's image tokens and the first one's index, from host tensors
    ids [B, L] and valid bool [B, L] (False = padding).

    per_image: each sample's count must be a positive multiple of it (None: at least one token).
    text_after: a text token must follow each sample's image (pruning scores with the last token).
    Raises ValueError in the client's wording (`errors`) for right or inner padding, image tokens
    that are missing, not contiguous, in the padding or (text_after) last."""
    B, L = ids.shape
    if (valid[:, :-1] & ~valid[:, 1:]).any() or not valid[:, -1].all():
        raise ValueError(errors.left_padding)
    is_image = ids == image_token_id
    counts, starts = [], []
    for b in range(B):
        where = is_image[b].nonzero().flatten().tolist()
        if per_image is None and not where:
            raise ValueError(f"input_ids: sample {b} has no image token (id {image_token_id}); a pruned batch needs "
                             "visual tokens in every sample")
        if per_image is not None and (not where or len(where) % per_image):
            raise ValueError(f"input_ids: sample {b} has {len(where)} image tokens (id {image_token_id}); "
                             f"expected a positive multiple of {per_image}, the features of one image")
        if where[-1] - where[0] + 1 != len(where):
            raise ValueError(errors.not_contiguous.format(b=b, n=len(where)))
        if not valid[b, where[0]]:
            raise ValueError(f"input_ids: sample {b}: image tokens fall in the padding")
        if text_after and where[-1] == L - 1:
            raise ValueError(errors.ends_with_image.format(b=b, n=len(where)))
        counts.append(len(where))
        starts.append(where[0])
    return counts, starts


class RaggedLayout(NamedTuple):
    """A ragged batch laid out padded: sample b's visual tokens at rows vis_start[b] .. + counts[b] of
    a block `width` = max(counts) rows wide, then block padding; samples left-padded."""
    src: Tensor         # int64 [B, L']: each row's flattened input_ids row (b * L + i), -1 for padding
    vis_start: Tensor   # int32 [B]
    counts: Tensor      # int64 [B]
    width: int
    image_rows: Optional[Tensor] = None  # int64 [sum(counts)]: the flattened rows of the visual tokens


def ragged_layout(valid: Tensor, counts: list, starts: list, device, *, image_rows: bool = False) -> RaggedLayout:
    """The padded layout of a ragged batch (host-side, from `check_spans`' counts and starts): each
    sample's visual tokens followed by max(counts) - counts[b] padding rows, the samples left-padded
    to a common length again. image_rows: also list the visual tokens' flattened rows (where a
    client that embeds the images itself writes their features)."""
    B, L = valid.shape
    M = max(counts)
    lengths = [int(valid[b].sum()) + M - counts[b] for b in range(B)]
    width = max(lengths)
    src = torch.full((B, width), -1, dtype=torch.long)
    vis_start, visual_rows = [], []
    for b in range(B):
        pad, lead = width - lengths[b], L - int(valid[b].sum())
        start = pad + starts[b] - lead
        rows = torch.arange(lead, L)  # the sample's valid tokens, in order
        new = torch.arange(pad, pad + len(rows))
        new = torch.where(rows >= starts[b] + counts[b], new + M - counts[b], new)
        src[b, new] = b * L + rows
        vis_start.append(start)
        if image_rows:
            visual_rows.append(b * width + start + torch.arange(counts[b]))
    return RaggedLayout(src.to(device), torch.tensor(vis_start, device=device, dtype=torch.int32),
                        torch.tensor(counts, device=device), M,
                        torch.cat(visual_rows).to(device) if image_rows else None)
