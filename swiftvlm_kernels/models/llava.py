"""LLaVA-1.5 in plain PyTorch, with visual-token pruning (SwiftVLM, FastV, PDrop, ALVTS) through the
pruning engine and the swiftvlm ops.

Read top to bottom: the modules (CLIP vision tower, MLP projector, LLaMA decoder, named like the
HF checkpoints so weights load by name), the KV cache, then `LlavaForward`: construction, input
checks, the prefill (the decoder loop of `pruning/loop.py` with this model's layers, masks and
caches) and the forward. Greedy decoding from the pruned KV caches lives in generate.py; checkpoint
and config reading in checkpoint.py; the visual-span checks and the rotate-half RoPE are shared with
the transformers path (`pruning/layout.py`, `pruning/loop.py`).

Tensor layouts: hidden states [B, n, d]; q [B, n, H, D], k and v [B, n, Hkv, D] (the projections'
own layout, so the engine moves rows with one index_select; attention reads them transposed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..pruning import PruningEngine, RaggedPlan, Sequence, loop
from ..pruning.layout import RaggedLayout, SpanErrors, check_spans, ragged_layout
from ..pruning.loop import StageInputs, Step, run_layers
from ..pruning.plan import check_pruning, plan_for_counts
from ..pruning.selector import selector_for
from . import checkpoint
from .generate import greedy


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def attend(q, k, v, mask):
    """SDPA over q [B, n, H, D] and k / v [B, m, Hkv, D] (GQA without repeated keys): causal when
    mask is None, else the boolean mask [B, 1, n, m] (True = attend). Returns [B, n, H * D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=mask is None and q.shape[1] > 1, enable_gqa=True)
    return out.transpose(1, 2).flatten(2)


class CLIPLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d))
        self.layer_norm1 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, c.intermediate_size), nn.Linear(c.intermediate_size, d)
        self.act = checkpoint.activation(c.hidden_act, "config.vision_config.hidden_act")
        self.layer_norm2 = nn.LayerNorm(d, eps=c.layer_norm_eps)

    def forward(self, h):
        B, n, d = h.shape
        a = self.self_attn
        x = self.layer_norm1(h)
        q, k, v = (p(x).view(B, n, self.heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        h = h + a.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, d))
        return h + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(h))))


class CLIPVisionTower(nn.Module):
    """CLIP ViT up to the deepest layer LLaVA reads; returns [embeddings after pre-LN, layer 1, ...]."""

    def __init__(self, c, num_layers):
        super().__init__()
        d, self.image_size, self.channels = c.hidden_size, c.image_size, c.num_channels
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.zeros(d))
        self.embeddings.patch_embedding = nn.Conv2d(c.num_channels, d, c.patch_size, c.patch_size, bias=False)
        self.embeddings.position_embedding = nn.Embedding(num_positions, d)
        self.pre_layrnorm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPLayer(c) for _ in range(num_layers))

    def forward(self, pixel_values):
        e = self.embeddings
        patches = e.patch_embedding(pixel_values.to(e.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = e.class_embedding.expand(patches.shape[0], 1, -1)
        h = self.pre_layrnorm(torch.cat([cls, patches], 1) + e.position_embedding.weight)
        states = [h]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return states


class Projector(nn.Module):
    def __init__(self, d_in, d_out, act, bias):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d_out, bias=bias), nn.Linear(d_out, d_out, bias=bias)
        self.act = checkpoint.activation(act, "config.projector_hidden_act")

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        d, bias = c.hidden_size, c.attention_bias
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)

    def query(self, x, cos, sin):
        """q [B, n, H, D] of the normed input x [B, n, d], rotated (`rope_table`'s sin: sign folded)."""
        return loop.rope(self.q_proj(x).unflatten(-1, (self.heads, self.head_dim)), cos, sin, folded=True)

    def keys(self, x, cos, sin):
        """k [B, n, Hkv, D], rotated."""
        return loop.rope(self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)), cos, sin, folded=True)

    def values(self, x):
        return self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = nn.Module()
        for name, shape in (("gate_proj", (c.hidden_size, c.intermediate_size)),
                            ("up_proj", (c.hidden_size, c.intermediate_size)),
                            ("down_proj", (c.intermediate_size, c.hidden_size))):
            setattr(self.mlp, name, nn.Linear(*shape, bias=c.mlp_bias))
        self.act = checkpoint.activation(c.hidden_act, "config.text_config.hidden_act")

    def forward(self, h, cos, sin, mask, cache=None, x=None, k=None):
        """One pre-norm block over h [B, n, d]; returns (h_out, q, k, v) of this call's tokens.
        x, k: the normed input and the keys when the caller already has them (a pruning stage
        scored with them). With a cache, the new keys / values are appended and attention reads it."""
        a = self.self_attn
        x = self.input_layernorm(h) if x is None else x
        q, v = a.query(x, cos, sin), a.values(x)
        k = a.keys(x, cos, sin) if k is None else k
        keys, values, mask = (k, v, mask) if cache is None else cache.append(k, v)
        h = h + a.o_proj(attend(q, keys, values, mask))
        x = self.post_attention_layernorm(h)
        return h + self.mlp.down_proj(self.act(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)), q, k, v


class KVCache:
    """One layer's keys / values: the tokens it ran on in the prefill, then the generated ones, in
    buffers [B, capacity, Hkv, D] that grow with the tokens produced (GROWTH slots at a time; the
    prefill's tokens are not copied until the first new token needs room). valid [B, size]: True
    where a slot holds a key."""

    GROWTH = 64

    def __init__(self, k, v, key_mask):
        B, n = k.shape[:2]
        self.k, self.v = k, v
        self.valid = torch.ones(B, n, dtype=torch.bool, device=k.device) if key_mask is None else key_mask
        self.size = n

    def append(self, k, v):
        """Write one token's k / v [B, 1, Hkv, D]; returns the keys, values and attention mask so far."""
        if self.size == self.k.shape[1]:
            grow = max(self.GROWTH, self.size // 4)
            self.k = torch.cat([self.k, self.k.new_zeros(self.k.shape[0], grow, *self.k.shape[2:])], 1)
            self.v = torch.cat([self.v, self.v.new_zeros(self.v.shape[0], grow, *self.v.shape[2:])], 1)
            self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], grow)], 1)
        self.k[:, self.size], self.v[:, self.size] = k[:, 0], v[:, 0]
        self.valid[:, self.size] = True
        self.size += 1
        n = self.size
        return self.k[:, :n], self.v[:, :n], self.valid[:, None, None, :n]


@dataclass
class LlavaOutput:
    logits: Tensor            # [B, L_last, vocab] with all_logits=True, else [B, 1, vocab] (the last token)
    last_logits: Tensor       # [B, vocab]: the last token's
    kept: list                # per stage, int64 [B, k_s]: visual-token indices (0..N_v-1) kept there
    sequence: Sequence        # the sequence after the last layer (its .index: each row's input position)
    hidden_states: Optional[list] = None  # output_hidden_states: per layer, its input [B, L_l, d]
    hidden_index: Optional[list] = None   # ... and each row's index in input_ids [B, L_l]
    layer_scores: Optional[list] = None   # output_scores: per layer, fp32 [B, M_l] T-V scores of
    #                                       the visual tokens at that layer's input (layer's q/k)

    @property
    def token_index(self) -> Tensor:
        """[B, L_last]: each row of the full logits' position in input_ids."""
        return self.sequence.index


class Inputs(NamedTuple):
    """Checked model inputs on the model's device."""
    input_ids: Tensor
    pixel_values: Tensor
    mask: Optional[Tensor]      # [B, L] valid tokens; None when nothing is padding
    counts: list                # visual tokens per sample (host ints)
    layout: Optional[RaggedLayout]  # a ragged batch's padded layout (with its image_rows), else None


# This forward's wording of the visual-span errors (pruning.layout.check_spans checks them).
SPAN_ERRORS = SpanErrors(
    left_padding="attention_mask: only left padding is supported (each row 0...0 1...1, the last token valid)",
    not_contiguous="input_ids: sample {b}: the {n} image tokens are not contiguous (a sample's images sit side by "
                   "side, one pool of visual tokens)",
    ends_with_image="input_ids: sample {b} ends with the image; pruning scores visual tokens with the last text "
                    "token's query, so a text token must follow the image")


class LlavaForward(nn.Module):
    """LLaVA (CLIP + MLP projector + LLaMA) with visual-token pruning through the pruning engine.

    Build with `from_pretrained(dir)` (an HF llava checkpoint, safetensors) or `from_config(dict)` +
    `load_tensors(mapping)`. dtype and device are fixed at construction. `backend` (None = each
    device's default kernels) is passed to every swiftvlm op.
    """

    def __init__(self, config: Mapping):
        super().__init__()
        self.config = dict(config)
        llava, vision, text = checkpoint.parse_config(config)
        self.text_config = text  # with the defaults filled in (prefill_flops reads it)
        self.feature_layers = llava.feature_layers
        self.keep_cls = llava.vision_feature_select_strategy == "full"
        self.image_token_id = int(llava.image_token_index)
        self.image_size, self.num_channels = vision.image_size, vision.num_channels
        self.num_visual_tokens = (vision.image_size // vision.patch_size) ** 2 + self.keep_cls
        self.num_layers, self.head_dim = text.num_hidden_layers, text.head_dim
        self.tied = llava.tie_word_embeddings
        self.backend = None

        self.vision_tower = CLIPVisionTower(vision, max(self.feature_layers))
        self.multi_modal_projector = Projector(vision.hidden_size * len(self.feature_layers), text.hidden_size,
                                               llava.projector_hidden_act, llava.multimodal_projector_bias)
        self.language_model = nn.Module()
        self.language_model.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.language_model.layers = nn.ModuleList(DecoderLayer(text) for _ in range(text.num_hidden_layers))
        self.language_model.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.inv_freq = checkpoint.rope_inv_freq(text)  # fp32, not a buffer: .to(dtype) must not round it

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping, dtype=torch.float32, device="cpu") -> "LlavaForward":
        """An uninitialised model (weights to be loaded) in `dtype` on `device`."""
        with torch.device("meta"):
            model = cls(config)
        return model._materialize(dtype, device)

    def _materialize(self, dtype, device) -> "LlavaForward":
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype: expected torch.float32, float16, bfloat16 or float64, got {dtype!r}")
        model = self.to(dtype).to_empty(device=device)
        model.inv_freq = model.inv_freq.to(device)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "LlavaForward":
        """Load an HF-format LLaVA checkpoint directory: config.json + *.safetensors (sharded with
        model.safetensors.index.json or not). Tensors are read with safetensors only. The config's
        fields, the index's shard names and every tensor's shape and dtype (from the safetensors
        headers) are checked before the model is allocated."""
        path = Path(path)
        config = checkpoint.read_config(path)
        source = str(path / "config.json")
        checkpoint.parse_config(config, source)
        tensors = checkpoint.SafetensorsCheckpoint(path)
        checkpoint.check_against_config(tensors, config, source)
        with torch.device("meta"):
            model = cls(config)
        model._match(tensors)  # every shape and dtype, still on the meta device
        model = model._materialize(dtype, device)
        model.load_tensors(tensors)
        return model

    def _match(self, tensors: Mapping) -> dict:
        """{parameter name: checkpoint key} for `tensors`, every needed tensor present with the
        parameter's shape and a floating-point dtype (ValueError naming it otherwise)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        keys = {name: key for name, key in checkpoint.canonical_keys(tensors).items() if name in params}
        if self.tied and "lm_head.weight" not in keys and "language_model.embed_tokens.weight" in keys:
            keys["lm_head.weight"] = keys["language_model.embed_tokens.weight"]
        if not keys:
            raise ValueError("checkpoint: no LLaVA tensor found (expected keys like "
                             "'language_model.model.layers.0.self_attn.q_proj.weight')")
        missing = sorted(set(params) - set(keys))
        if missing:
            raise ValueError(f"checkpoint: {len(missing)} tensors missing: {', '.join(missing[:8])}"
                             + (", ..." if len(missing) > 8 else ""))
        for name, key in keys.items():
            shape = tensors.shape(key) if hasattr(tensors, "shape") else tuple(getattr(tensors[key], "shape", ()))
            if tuple(shape) != tuple(params[name].shape):
                raise ValueError(f"checkpoint tensor {key}: shape {tuple(shape)} does not match the config "
                                 f"({tuple(params[name].shape)})")
            checkpoint.check_tensor_dtype(tensors, key)
        return keys

    def load_tensors(self, tensors: Mapping):
        """Copy checkpoint tensors (any llava-hf key layout, see `checkpoint.canonical_name`) into the
        model. Unused tensors (vision layers past the feature layer, post_layernorm) are ignored; a
        missing, mis-shaped or non-floating tensor, or one weight under two keys, is a ValueError
        naming it, raised before anything is copied."""
        keys = self._match(tensors)
        params = dict(self.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, key in keys.items():
                if name == "lm_head.weight" and self.tied and key == keys.get("language_model.embed_tokens.weight"):
                    continue
                params[name].copy_(tensors[key])
        if self.tied and keys.get("lm_head.weight") == keys.get("language_model.embed_tokens.weight"):
            self.lm_head.weight = self.language_model.embed_tokens.weight

    # -- input checks (the only place that reads tensor values on the host) ----------------------

    def plan_for(self, pruning, n_vis=None):
        """The plan this model executes for `pruning` (None, a pruning object, a PruningPlan or a
        RaggedPlan) on samples of n_vis visual tokens (default: one image's); n_vis a sequence of
        per-sample counts that differ gives a RaggedPlan (each sample's plan for its own count)."""
        if pruning is None:
            return None
        check_pruning(pruning)
        if getattr(pruning, "official", False):
            raise ValueError("pruning: PDrop(official=True) runs through swiftvlm_kernels.hf on a transformers "
                             "model; this forward runs the library's PDrop timing (official=False)")
        if self.lm_head.weight.dtype == torch.float64:
            raise ValueError("pruning: the swiftvlm ops take float32, float16 or bfloat16 hidden states; this model "
                             "is float64 (load it in float32 to prune)")
        counts = [self.num_visual_tokens] if n_vis is None else [n_vis] if isinstance(n_vis, int) else list(n_vis)
        return plan_for_counts(pruning, counts, self.num_layers)

    def selector_for(self, pruning, plan):
        """The selector an ALVTS plan runs with (the method's, else the default SVD selector of this
        model, made once: `pruning.selector`); None for other plans."""
        return selector_for(pruning, plan, self.language_model.layers, self.text_config.hidden_size)

    def check_inputs(self, input_ids, pixel_values, attention_mask, pruning) -> Inputs:
        """Validated inputs on the model's device; attention_mask None when nothing is padding."""
        device = self.lm_head.weight.device
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("input_ids: expected an int64 or int32 tensor [B, L], got "
                             + (f"{input_ids.dtype} of shape {list(input_ids.shape)}" if isinstance(input_ids, Tensor)
                                else type(input_ids).__name__))
        B, L = input_ids.shape
        if B == 0 or L == 0:
            raise ValueError(f"input_ids: expected at least one sample of at least one token, got shape [{B}, {L}]")
        size = (self.num_channels, self.image_size, self.image_size)
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != size \
                or not pixel_values.is_floating_point() or pixel_values.shape[0] < B:
            raise ValueError(f"pixel_values: expected a float tensor of shape [I, {', '.join(map(str, size))}] with "
                             f"I >= {B} images (the samples' images in order, at least one per sample), got "
                             f"{list(getattr(pixel_values, 'shape', []))} {getattr(pixel_values, 'dtype', '')}")
        if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                           or tuple(attention_mask.shape) != (B, L)):
            raise ValueError(f"attention_mask: expected a tensor of shape [{B}, {L}], got "
                             f"{list(getattr(attention_mask, 'shape', [])) or type(attention_mask).__name__}")
        ids = input_ids.cpu()
        vocab = self.text_config.vocab_size
        outside = ((ids < 0) | (ids >= vocab)) & (ids != self.image_token_id)
        if outside.any():
            bad = ids[outside]
            raise ValueError(f"input_ids: expected token ids in [0, {vocab}) (the vocabulary) or the image token "
                             f"{self.image_token_id}, got values in [{int(bad.min())}, {int(bad.max())}]")
        valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.cpu()
        if not ((valid == 0) | (valid == 1)).all():
            raise ValueError("attention_mask: expected 0 / 1 values")
        valid = valid.bool()
        per_image, I = self.num_visual_tokens, pixel_values.shape[0]
        counts, starts = check_spans(ids, valid, self.image_token_id, SPAN_ERRORS, per_image=per_image,
                                     text_after=bool(pruning))
        if sum(counts) != I * per_image:
            raise ValueError(f"pixel_values: the image tokens of input_ids ask for {sum(counts) // per_image} images "
                             f"({per_image} tokens each), got {I}")
        mask = None if valid.all() else valid.to(device)
        layout = ragged_layout(valid, counts, starts, device, image_rows=True) if len(set(counts)) > 1 else None
        return Inputs(input_ids.to(device), pixel_values.to(device), mask, counts, layout)

    def check_stage_scores(self, stage_scores, plan, B):  # noqa: C901
        """stage_scores checked against the plan: one entry per stage, each None or fp32-able [B, M_s]
        scores of the visual tokens that stage scores (on the model's device)."""
        if stage_scores is None:
            return None
        if plan is None:
            raise ValueError("stage_scores: given without pruning (there is no stage to score)")
        if not isinstance(stage_scores, (list, tuple)) or len(stage_scores) != len(plan.stages):
            raise ValueError(f"stage_scores: expected a list of {len(plan.stages)} entries (one per stage, each a "
                             f"tensor or None), got {type(stage_scores).__name__} of length "
                             f"{len(stage_scores) if isinstance(stage_scores, (list, tuple)) else '-'}")
        device = self.lm_head.weight.device
        out = []
        for s, scores in enumerate(stage_scores):
            if scores is None:
                out.append(None)
                continue
            want = (B, plan.scored_widths(s) if isinstance(plan, RaggedPlan) else plan.scored_tokens(s))
            if not isinstance(scores, Tensor) or not scores.is_floating_point() or tuple(scores.shape) != want:
                raise ValueError(f"stage_scores[{s}]: expected a float tensor of shape {list(want)} (batch, the "
                                 f"visual tokens stage {s + 1} scores), got "
                                 f"{list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
                                 f"{'' if not isinstance(scores, Tensor) else ' ' + str(scores.dtype)}")
            out.append(scores.to(device))
        return out

    # -- the prefill --------------------------------------------------------------------------------

    def image_features(self, pixel_values):
        """[B, N_v, d_text]: the projected CLIP features LLaVA places at the image tokens."""
        states = self.vision_tower(pixel_values)
        features = torch.cat([states[i] for i in self.feature_layers], -1)
        return self.multi_modal_projector(features if self.keep_cls else features[:, 1:])

    def embed(self, input_ids, pixel_values, vis_start, layout=None):
        """Token embeddings with the image features written over the image tokens' span (a sample's
        images in order, side by side); a ragged batch's in its padded layout (padding rows zero)."""
        B = input_ids.shape[0]
        image = self.image_features(pixel_values)
        if layout is not None:
            ids = input_ids.reshape(-1)[layout.src.clamp_min(0)]
            text = self.language_model.embed_tokens(torch.where(ids == self.image_token_id, 0, ids))
            text = torch.where((layout.src >= 0)[..., None], text, 0)
            d = text.shape[-1]
            return text.view(-1, d).index_copy_(0, layout.image_rows, image.reshape(-1, d).to(text.dtype)).view_as(text)
        text = self.language_model.embed_tokens(torch.where(input_ids == self.image_token_id, 0, input_ids))
        image = image.reshape(B, -1, image.shape[-1]).to(text.dtype)
        rows = vis_start[:, None] + torch.arange(image.shape[1], device=text.device)
        return text.scatter(1, rows[..., None].expand(-1, -1, text.shape[-1]), image)

    def rope_table(self, positions, dtype):
        """[B, n, 2, head_dim] at integer positions [B, n]: cos, and sin with rotate_half's sign
        (-sin on the first half), fp32 math, then dtype."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return torch.stack([torch.cat([freqs, freqs], -1).cos(), torch.cat([-freqs, freqs], -1).sin()], 2).to(dtype)

    @staticmethod
    def attention_mask(key_mask):
        """None (causal attention) without padding; else [B, 1, L, L]: causal among valid keys, and
        every query sees itself (a padding row never has an empty softmax). With left padding the
        mask of a pruned sequence of n rows is this one's [:n, :n] corner: padding rows are never
        pruned, so row i is padding exactly when it was in the input."""
        if key_mask is None:
            return None
        L = key_mask.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=key_mask.device).tril_()
        return ((causal & key_mask[:, None, :]) | torch.eye(L, dtype=torch.bool, device=key_mask.device))[:, None]

    def prefill(self, input_ids, pixel_values, attention_mask, plan, *, caching=False, hidden=None,
                scores=None, stage_scores=None, layout=None, selector=None):
        """The decoder layers over a sequence that the plan's stages shorten (`pruning.loop.run_layers`).
        Returns the final sequence (its h after the last norm) and, with caching, the per-layer KV
        caches. hidden / scores: lists that receive each layer's input (with its input positions) /
        each layer's T-V scores. selector: an ALVTS plan's (default: the default SVD selector)."""
        B, L = input_ids.shape
        if layout is not None:  # a ragged batch: its padded layout, the block padding invalid keys
            vis_start, n_vis, attention_mask = layout.vis_start, layout.width, layout.src >= 0
            L = attention_mask.shape[1]
        else:
            vis_start = (input_ids == self.image_token_id).int().argmax(1)
            n_vis = pixel_values.shape[0] // B * self.num_visual_tokens
        h = self.embed(input_ids, pixel_values, vis_start, layout)
        positions = torch.arange(L, device=h.device).expand(B, L) if attention_mask is None else \
            (attention_mask.long().cumsum(1) - 1).clamp_min(0)
        seq = Sequence.begin(h, vis_start, n_vis, attention_mask, carry={"rope": self.rope_table(positions, h.dtype)},
                             left_padded=layout is None, vis_counts=None if layout is None else layout.counts)
        engine = PruningEngine(plan, self.head_dim ** -0.5, self.backend) if plan is not None else None
        layers, caches = self.language_model.layers, []
        if selector is None:
            selector = self.selector_for(None, plan)
        full_mask = self.attention_mask(attention_mask)
        mask = full_mask

        def inputs_before(i, seq):  # a SwiftVLM stage >= 2 scores with layer i on the restored sequence
            if selector is not None:  # ALVTS: layer i's selector on the full sequence
                return loop.selector_stage_inputs(layers[i - 1], selector, i, seq.h)
            x, k, q_last = self.stage_inputs(layers[i - 1], seq)
            return StageInputs(q_last, k.transpose(1, 2), (x, k))

        def restaged(seq, s):
            nonlocal mask
            mask = self._corner(full_mask, seq)

        def run_layer(seq, step: Step):
            x = k = None
            if step.prepared is not None and plan.stages[step.before].merge == 0:
                # Reuse the scoring pass's normed input and keys (ALVTS: the normed input) for the
                # layer's rows, unless the stage merged: a merged row then carries its group's mean,
                # not the state they were computed on, and the layer computes its inputs afresh
                # (fewer ops than patching Z rows).
                x, k = (None if t is None else seq.take(t) for t in step.prepared.extra)
            if hidden is not None:
                hidden.append((seq.h, seq.index))
            cos, sin = seq.carry["rope"].unbind(2)
            seq.h, q, k, v = layers[step.layer - 1](seq.h, cos, sin, mask, x=x, k=k)
            if caching:
                caches.append(KVCache(k, v, seq.key_mask))
            if scores is not None:
                scores.append(self._layer_scores(seq, q, k))
            # a first / drop-only stage after this layer scores with its own query and keys
            return StageInputs(q[:, -1], k.transpose(1, 2)) if step.after is not None else None

        seq = run_layers(seq, plan, engine, len(layers), run_layer, stage_inputs=inputs_before, restaged=restaged,
                         scores=lambda s: self._scores(stage_scores, s))
        seq.h = self.language_model.norm(seq.h)
        return seq, caches

    @staticmethod
    def stage_inputs(layer, seq):
        """What a stage that acts before `layer` scores with, on the restored sequence: the normed
        input x, the keys of every row and the last token's query (Eq. 19's extra work: the rest
        tokens' keys and one query). The layer then reuses x and the keys of its kept rows when the
        stage merges nothing (otherwise it recomputes them: pruning/flops.py counts that)."""
        cos, sin = seq.carry["rope"].unbind(2)
        return loop.stage_inputs(layer, seq.h, cos, sin, folded=True)

    def _corner(self, full_mask, seq):
        """The attention mask of a pruned left-padded sequence: the input mask's [:n, :n] corner (a
        ragged batch's, whose block padding rows move: rebuilt from the key mask); the input mask
        itself for the input sequence (after ALVTS' skipped tokens rejoined)."""
        if seq.src is None:
            return full_mask
        if not seq.left_padded and seq.key_mask is not None:
            return self.attention_mask(seq.key_mask)
        n = seq.h.shape[1]
        return None if full_mask is None else full_mask[:, :, :n, :n]

    def _layer_scores(self, seq, q, k):
        vis_len, width = (seq.vis_len, None) if seq.vis_counts is None else (seq.vis_counts, seq.vis_len)
        return ops.tv_score(q[:, -1], k.transpose(1, 2), seq.vis_start, vis_len, self.head_dim ** -0.5, seq.key_mask,
                            max_vis_len=width, backend=self.backend)

    @staticmethod
    def _scores(stage_scores, s):
        return None if stage_scores is None or stage_scores[s] is None else stage_scores[s].float()

    @torch.no_grad()
    def forward(self, input_ids, pixel_values, attention_mask=None, pruning=None, *, all_logits=False,
                output_hidden_states=False, output_scores=False, stage_scores=None) -> LlavaOutput:
        """Prefill logits with `pruning` (a SwiftVLM / FastV / PDrop / ALVTS object, a PruningPlan, or None).

        input_ids [B, L] hold exactly N_v contiguous image tokens per sample (anywhere, after any left
        padding); pixel_values [B, C, S, S]; attention_mask [B, L] (0 = left padding). The logits are
        the last token's unless all_logits=True (every row that reaches the last layer).
        Analysis options: output_hidden_states (each layer's input, with token indices),
        output_scores (each layer's T-V scores of its visual tokens), stage_scores (per stage, fp32
        [B, M] scores of the stage's current visual tokens that replace the model's own, or None).
        """
        self.plan_for(pruning)  # the pruning argument checked before the inputs
        hidden, scores = ([] if output_hidden_states else None), ([] if output_scores else None)
        inputs = self.check_inputs(input_ids, pixel_values, attention_mask, pruning is not None)
        plan = self.plan_for(pruning, inputs.counts)
        seq, _ = self.prefill(inputs.input_ids, inputs.pixel_values, inputs.mask, plan, hidden=hidden, scores=scores,
                              stage_scores=self.check_stage_scores(stage_scores, plan, inputs.input_ids.shape[0]),
                              layout=inputs.layout, selector=self.selector_for(pruning, plan))
        logits = self.lm_head(seq.h if all_logits else seq.h[:, -1:])
        return LlavaOutput(logits, logits[:, -1], seq.kept, seq,
                           [h for h, _ in hidden] if hidden is not None else None,
                           [i for _, i in hidden] if hidden is not None else None, scores)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values, attention_mask=None, pruning=None, max_new_tokens=16, *,
                 stage_scores=None) -> Tensor:
        """Greedy decoding after a (pruned) prefill: int64 [B, max_new_tokens] (generate.py). Every
        layer attends to the keys it kept in the prefill plus the new tokens'; new position ids
        continue from each sample's unpadded prompt length (docs/semantics.md property 5). No early stop at EOS."""
        return greedy(self, input_ids, pixel_values, attention_mask, pruning, max_new_tokens, stage_scores=stage_scores)
