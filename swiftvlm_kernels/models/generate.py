"""Greedy decoding for the minimal LLaVA forward (`LlavaForward.generate`): a (pruned) prefill that
keeps each layer's KV cache, then one token at a time through every layer.

Each layer's cache holds the keys and values of exactly the tokens that layer ran on in the prefill
(fewer after a pruning stage), then the generated ones; new position ids continue from each sample's
unpadded prompt length, never from a pruned length (docs/semantics.md property 5). Nothing here reads device
values on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor


def greedy(model, input_ids, pixel_values, attention_mask=None, pruning=None, max_new_tokens=16, *,
           stage_scores=None) -> Tensor:
    """int64 [B, max_new_tokens]: the argmax token at every step (no early stop at EOS), after
    `model`'s prefill with `pruning` (arguments as `LlavaForward.forward`)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    model.plan_for(pruning)
    inputs = model.check_inputs(input_ids, pixel_values, attention_mask, pruning is not None)
    plan = model.plan_for(pruning, inputs.counts)
    input_ids, pixel_values, mask, layout = inputs.input_ids, inputs.pixel_values, inputs.mask, inputs.layout
    if layout is not None:
        mask = layout.src >= 0
    limit = model.text_config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens: the prompt's {input_ids.shape[1]} tokens and {max_new_tokens} new ones "
                         f"exceed max_position_embeddings = {limit} of the config; expected at most "
                         f"{max(0, limit - input_ids.shape[1])}")
    seq, caches = model.prefill(input_ids, pixel_values, inputs.mask, plan, caching=True, layout=layout,
                                stage_scores=model.check_stage_scores(stage_scores, plan, input_ids.shape[0]),
                                selector=model.selector_for(pruning, plan))
    token = model.lm_head(seq.h[:, -1]).argmax(-1)
    tokens = [token]
    prompt_len = input_ids.new_full((input_ids.shape[0],), input_ids.shape[1]) if mask is None else mask.sum(1)
    for t in range(max_new_tokens - 1):
        token = decode_step(model, caches, token, prompt_len + t).argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, 1)


def decode_step(model, caches, token: Tensor, position: Tensor) -> Tensor:
    """One decoding step: token int64 [B] at position int64 [B] through every layer, its keys and values
    appended to each layer's cache (`KVCache`); returns the next token's logits [B, vocab]."""
    lm = model.language_model
    h = lm.embed_tokens(token)[:, None]
    cos, sin = model.rope_table(position[:, None], h.dtype).unbind(2)
    for layer, cache in zip(lm.layers, caches):
        h = layer(h, cos, sin, None, cache)[0]
    return model.lm_head(lm.norm(h[:, -1]))
