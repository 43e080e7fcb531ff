"""A minimal LLaVA forward with SwiftVLM / FastV / PDrop visual-token pruning and greedy decoding.

One file of plain PyTorch, read top to bottom:
  1. config parsing (llava-hf config.json, with the transformers defaults that such files omit),
  2. the modules: CLIP vision tower (pre-LN), 2-layer MLP projector, LLaMA decoder (RMSNorm, RoPE,
     SwiGLU, GQA), named like the HF checkpoints so weights load by name,
  3. the prefill: the decoder layers run on a sequence that pruning stages shorten,
  4. greedy decoding from the per-layer KV caches the prefill leaves behind,
  5. checkpoint loading (safetensors only).

The pruned sequence. Text tokens are never pruned and every sample has exactly N_v image tokens in
one contiguous span starting at vis_start[b]; so at any layer the sequence of sample b is
    [the vis_start[b] tokens before the image] [a visual block of M tokens] [the tokens after it]
with the same M for every sample, and the batch stays rectangular. Three tensors describe it:
  h       [B, L_cur, d]  hidden states,
  orig    [B, L_cur]     each token's index in the input sequence (a merged token: its group
                         target's), from which position ids and the padding mask are gathered,
  vis_ids [B, M]         the visual-token index (0..N_v-1) of each token of the visual block,
                         ascending, so the sequence stays ordered by position id.
A stage rebuilds the block and splices it back with one gather (`_splice`); nothing reads tensor
values on the host between the model entry and the returned tokens.

Bypass (SwiftVLM, Fig. 5). A stage that merges sets aside the rest tokens' states (h^x), their
group ids, the merged tokens as made (h~^x_gm) and where the kept and merged tokens sit in the new
block (`_Bypass`). Before the next stage, `_restore` writes the kept tokens and the aligned rest
tokens (bypass_align_into, rows = visual ids) into a fresh [B, N_v, d] block that replaces it.

KV caches. Each layer keeps the keys/values of exactly the tokens it ran on in the prefill, with
their padding mask, in a buffer with room for the new tokens (`KVCache`); the new token of step t
has position id (unpadded prompt length) + t.

Stage timing (docs/CONTRACT.md): the first stage and every drop-only stage score with layer x's own
query/keys, layer x runs on all current tokens, and the selection takes effect from layer x + 1.
A SwiftVLM stage s >= 2 at layer y first restores the bypassed tokens (Eq. 12-13), scores all N_v
visual tokens with layer y's query/keys, and layer y already runs on the kept set.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from python_ref import group_targets

from . import ops
from .pruning import PruningPlan

# ---------------------------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------------------------

# transformers' defaults, which llava-hf config.json files leave out.
_LLAVA_DEFAULTS = dict(image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", multimodal_projector_bias=True,
                       tie_word_embeddings=False)
_CLIP_DEFAULTS = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=12, num_channels=3, image_size=224,
                      patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_LLAMA_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                       head_dim=None, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
                       rope_scaling=None, rope_parameters=None, attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=False)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
                "gelu_new": partial(F.gelu, approximate="tanh"), "quick_gelu": _quick_gelu,
                "silu": F.silu, "relu": F.relu}


def _activation(name, where):
    if name not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


class _Config:
    """Attribute access to a config dict over defaults."""

    def __init__(self, values: Mapping, defaults: Mapping):
        self.__dict__.update(defaults)
        self.__dict__.update({k: v for k, v in values.items() if v is not None or k not in defaults})


def parse_config(config: Mapping):
    """(llava, vision, text) configs from an HF LLaVA config dict; ValueError for other models."""
    if not isinstance(config, Mapping) or config.get("model_type") != "llava":
        got = config.get("model_type") if isinstance(config, Mapping) else type(config).__name__
        raise ValueError(f"config: not a LLaVA config (expected model_type 'llava', got {got!r})")
    llava = _Config(config, _LLAVA_DEFAULTS)
    if "image_token_id" in config:  # newer configs spell it this way
        llava.image_token_index = config["image_token_id"]
    vision = _Config(config.get("vision_config") or {}, _CLIP_DEFAULTS)
    text = _Config(config.get("text_config") or {}, _LLAMA_DEFAULTS)
    if vision.model_type != "clip_vision_model":
        raise ValueError("config.vision_config: only a CLIP vision tower is supported, "
                         f"got model_type {vision.model_type!r}")
    if text.model_type != "llama":
        raise ValueError(f"config.text_config: only a LLaMA decoder is supported, got model_type {text.model_type!r}")
    if llava.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError("config.vision_feature_select_strategy: expected 'default' or 'full', "
                         f"got {llava.vision_feature_select_strategy!r}")
    text.num_key_value_heads = text.num_key_value_heads or text.num_attention_heads
    text.head_dim = text.head_dim or text.hidden_size // text.num_attention_heads
    if text.num_attention_heads % text.num_key_value_heads:
        raise ValueError(f"config.text_config: num_attention_heads ({text.num_attention_heads}) is not a "
                         f"multiple of num_key_value_heads ({text.num_key_value_heads})")
    llava.tie_word_embeddings = bool(llava.tie_word_embeddings or text.tie_word_embeddings)
    return llava, vision, text


def rope_inv_freq(text) -> Tensor:
    """fp32 [head_dim / 2] RoPE inverse frequencies: default, linear or llama3 scaling."""
    rope = dict(text.rope_parameters or text.rope_scaling or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", text.rope_theta)
    dim = text.head_dim
    # on the CPU explicitly: models are built on the meta device
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":  # long wavelengths slowed by `factor`, short kept, a smooth ramp between
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        ramp = (1 - smooth) * slowed / factor + smooth * slowed
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, ramp, slowed)
    raise ValueError(f"config.text_config: RoPE type {kind!r} is not supported (default, linear, llama3)")


# ---------------------------------------------------------------------------------------------
# 2. Modules (parameter names follow the HF checkpoints)
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _attend(q, k, v, attn_mask):
    """SDPA with GQA: q [B, H, Lq, D], k/v [B, Hkv, Lk, D], boolean attn_mask (True = attend)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


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
        self.act = _activation(c.hidden_act, "config.vision_config.hidden_act")
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
        self.act = _activation(act, "config.projector_hidden_act")

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

    def project(self, x, cos, sin):
        """q [B, H, L, D], k / v [B, Hkv, L, D]; q and k rotated at the tokens' position ids."""
        B, n, _ = x.shape
        q = self.q_proj(x).view(B, n, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, n, self.kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, n, self.kv_heads, -1).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


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
        self.act = _activation(c.hidden_act, "config.text_config.hidden_act")

    def forward(self, h, cos, sin, attn_mask, cache=None):
        """One pre-norm block. Returns (h_out, q, k, v); q, k, v are this call's tokens' (RoPE'd).
        With a KV cache the new keys/values are appended and attention reads the whole cache."""
        q, k, v = self.self_attn.project(self.input_layernorm(h), cos, sin)
        keys, values = (k, v) if cache is None else cache.append(k, v)
        attn_mask = attn_mask if cache is None else cache.mask[:, None, None, :]
        out = _attend(q, keys, values, attn_mask)
        h = h + self.self_attn.o_proj(out.transpose(1, 2).reshape(*h.shape[:2], -1))
        x = self.post_attention_layernorm(h)
        h = h + self.mlp.down_proj(self.act(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))
        return h, q, k, v


class KVCache:
    """One layer's keys/values: the tokens this layer processed in the prefill, then the generated
    ones, in a buffer allocated once. mask [B, capacity]: True where a slot holds a valid key."""

    def __init__(self, k, v, key_mask, new_tokens):
        B, Hkv, n, D = k.shape
        self.k = torch.cat([k, k.new_zeros(B, Hkv, new_tokens, D)], 2)
        self.v = torch.cat([v, v.new_zeros(B, Hkv, new_tokens, D)], 2)
        self.mask = torch.cat([key_mask, key_mask.new_zeros(B, new_tokens)], 1)
        self.size = n

    def append(self, k, v):
        """Write one token's k / v [B, Hkv, 1, D]; returns the whole buffers."""
        self.k[:, :, self.size] = k[:, :, 0]
        self.v[:, :, self.size] = v[:, :, 0]
        self.mask[:, self.size] = True
        self.size += 1
        return self.k, self.v


@dataclass
class LlavaOutput:
    logits: Tensor            # [B, L_last, vocab]: every position that reaches the last layer
    last_logits: Tensor       # [B, vocab]: the last token's
    kept: list                # per stage, int64 [B, k_s]: visual-token indices (0..N_v-1) kept there
    token_index: Tensor       # [B, L_last]: each logits row's index in input_ids
    hidden_states: Optional[list] = None  # output_hidden_states: per layer, its input [B, L_l, d]
    hidden_index: Optional[list] = None   # ... and each row's index in input_ids [B, L_l]
    layer_scores: Optional[list] = None   # output_scores: per layer, fp32 [B, M_l] T-V scores of
    #                                       the visual tokens at that layer's input (layer's q/k)


@dataclass
class _Bypass:
    """The rest of a SwiftVLM stage, set aside until the next stage (Fig. 5)."""
    kept_ids: Tensor      # [B, k] visual ids of the kept tokens
    rest_ids: Tensor      # [B, R] visual ids of the bypassed tokens
    rest_h: Tensor        # [B, R, d] their hidden states when set aside (h^x in Eq. 13)
    group: Tensor         # [B, R] their merged token
    merged_then: Tensor   # [B, Z, d] the merged tokens when they were made (h~^x_gm in Eq. 12)
    kept_slots: Tensor    # [B, k] where the kept tokens sit in the visual block
    merged_slots: Tensor  # [B, Z] where the merged tokens sit in the visual block


@dataclass
class _Prefill:
    h: Tensor             # [B, L_last, d] after the final norm
    orig: Tensor          # [B, L_last]
    kept: list
    caches: list = field(default_factory=list)
    hidden_states: Optional[list] = None
    hidden_index: Optional[list] = None
    layer_scores: Optional[list] = None


def _gather_rows(x, idx):
    """x [B, L, c], idx int64 [B, n] -> x[b, idx[b, i]] as [B, n, c]."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _splice(x, vis_start, m_old, block):
    """Replace the m_old-row visual block of x [B, L, c] (at vis_start [B]) by block [B, m_new, c]."""
    L, m_new = x.shape[1], block.shape[1]
    j = torch.arange(L - m_old + m_new, device=x.device)
    rel = j - vis_start[:, None]
    src = torch.where(rel < 0, j, torch.where(rel < m_new, L + rel, j - m_new + m_old))
    return _gather_rows(torch.cat([x, block], 1), src)


def _visual_block(h, vis_start, m):
    """The m tokens of the visual block of h [B, L, d]: [B, m, d]."""
    return _gather_rows(h, vis_start[:, None] + torch.arange(m, device=h.device))


def _replace_block(h, orig, vis_start, m, block, ids):
    """h and orig with their m-token visual block replaced by `block` [B, m', d] of visual ids [B, m']."""
    h = _splice(h, vis_start, m, block)
    orig = _splice(orig[..., None], vis_start, m, (vis_start[:, None] + ids)[..., None])[..., 0]
    return h, orig


# ---------------------------------------------------------------------------------------------
# 3. The model
# ---------------------------------------------------------------------------------------------

class LlavaForward(nn.Module):
    """LLaVA (CLIP + MLP projector + LLaMA) with visual-token pruning through torch.ops.swiftvlm.

    Build with `from_pretrained(dir)` (an HF llava checkpoint, safetensors) or `from_config(dict)`
    + `load_tensors(mapping)`. dtype and device are fixed at construction. `backend` (None = the
    SWIFTVLM_BACKEND / auto choice) is passed to every swiftvlm op.
    """

    def __init__(self, config: Mapping):
        super().__init__()
        self.config = dict(config)
        llava, vision, text = parse_config(config)
        self.text_config = text  # with the defaults filled in (flops.prefill_flops reads it)
        layers = llava.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        depth = vision.num_hidden_layers + 1  # hidden states: embeddings + one per layer
        if not self.feature_layers or any(not -depth <= i < depth for i in self.feature_layers):
            raise ValueError(f"config.vision_feature_layer: expected indices in [{-depth}, {depth - 1}], "
                             f"got {layers!r}")
        self.feature_layers = [i % depth for i in self.feature_layers]
        self.keep_cls = llava.vision_feature_select_strategy == "full"
        self.image_token_id = llava.image_token_index
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
        self.inv_freq = rope_inv_freq(text)  # fp32, not a buffer: .to(dtype) must not round it

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping, dtype=torch.float32, device="cpu") -> "LlavaForward":
        """An uninitialised model (weights to be loaded) in `dtype` on `device`."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype).to_empty(device=device)
        model.inv_freq = model.inv_freq.to(device)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "LlavaForward":
        """Load an HF-format LLaVA checkpoint directory: config.json + *.safetensors (sharded with
        model.safetensors.index.json or not). Tensors are read with safetensors only."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"LLaVA checkpoint directory not found: {path}")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (not an HF-format checkpoint directory)")
        model = cls.from_config(json.loads(config_file.read_text()), dtype, device)
        model.load_tensors(_SafetensorsCheckpoint(path))
        return model

    def load_tensors(self, tensors: Mapping):
        """Copy checkpoint tensors (any llava-hf key layout, see `canonical_name`) into the model.
        Unused tensors (vision layers past the feature layer, post_layernorm) are ignored; a missing
        or mis-shaped tensor is a ValueError naming it."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        with torch.no_grad():
            for key in tensors:
                name = canonical_name(key)
                if name not in params:
                    continue
                t = tensors[key]
                if tuple(t.shape) != tuple(params[name].shape):
                    raise ValueError(f"checkpoint tensor {key}: shape {tuple(t.shape)} does not match the config "
                                     f"({tuple(params[name].shape)})")
                params[name].copy_(t)
                loaded.add(name)
        if self.tied and "lm_head.weight" not in loaded and "language_model.embed_tokens.weight" in loaded:
            self.lm_head.weight = self.language_model.embed_tokens.weight
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if len(missing) == len(params):
            raise ValueError("checkpoint: no LLaVA tensor found (expected keys like "
                             "'language_model.model.layers.0.self_attn.q_proj.weight')")
        if missing:
            raise ValueError(f"checkpoint: {len(missing)} tensors missing: {', '.join(missing[:8])}"
                             + (", ..." if len(missing) > 8 else ""))

    # -- input checks (the only place that reads tensor values on the host) ----------------------

    def plan_for(self, pruning) -> Optional[PruningPlan]:
        """The PruningPlan this model executes for `pruning` (None, a pruning object or a plan)."""
        if pruning is None:
            return None
        plan = pruning if isinstance(pruning, PruningPlan) else pruning.plan(self.num_visual_tokens, self.num_layers)
        if (plan.n_vis, plan.num_layers) != (self.num_visual_tokens, self.num_layers):
            raise ValueError(f"pruning: the plan is for n_vis = {plan.n_vis}, num_layers = {plan.num_layers}; "
                             f"this model has {self.num_visual_tokens} visual tokens and {self.num_layers} layers")
        return plan

    def _check_inputs(self, input_ids, pixel_values, attention_mask, plan):
        device = self.lm_head.weight.device
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError("input_ids: expected an integer tensor [B, L], "
                             f"got {getattr(input_ids, 'shape', input_ids)}")
        B, L = input_ids.shape
        size = (B, self.num_channels, self.image_size, self.image_size)
        if not isinstance(pixel_values, Tensor) or tuple(pixel_values.shape) != size:
            raise ValueError(f"pixel_values: expected shape {list(size)} (one image per sample), "
                             f"got {list(getattr(pixel_values, 'shape', []))}")
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool)
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask: expected shape [{B}, {L}], got {list(attention_mask.shape)}")
        ids, valid = input_ids.cpu(), attention_mask.cpu()
        if not ((valid == 0) | (valid == 1)).all():
            raise ValueError("attention_mask: expected 0 / 1 values")
        valid = valid.bool()
        if (valid[:, :-1] & ~valid[:, 1:]).any() or not valid[:, -1].all():
            raise ValueError("attention_mask: only left padding is supported (each row 0...0 1...1, "
                             "the last token valid)")
        n_vis = self.num_visual_tokens
        is_image = ids == self.image_token_id
        for b in range(B):
            where = is_image[b].nonzero().flatten().tolist()
            if len(where) != n_vis:
                raise ValueError(f"input_ids: sample {b} has {len(where)} image tokens (id {self.image_token_id}), "
                                 f"the image gives {n_vis} features")
            if where[-1] - where[0] + 1 != n_vis:
                raise ValueError(f"input_ids: sample {b}: the {n_vis} image tokens are not contiguous")
            if not valid[b, where[0]]:
                raise ValueError(f"input_ids: sample {b}: image tokens fall in the padding")
            if plan is not None and where[-1] == L - 1:
                raise ValueError(f"input_ids: sample {b} ends with the image; pruning scores visual tokens "
                                 "with the last text token's query, so a text token must follow the image")
        return input_ids.to(device), pixel_values.to(device), attention_mask.to(device).bool()

    # -- the forward ------------------------------------------------------------------------------

    def image_features(self, pixel_values):
        """[B, N_v, d_text]: the projected CLIP features LLaVA places at the image tokens."""
        states = self.vision_tower(pixel_values)
        features = torch.cat([states[i] for i in self.feature_layers], -1)
        return self.multi_modal_projector(features if self.keep_cls else features[:, 1:])

    def embed(self, input_ids, pixel_values, vis_start):
        """Token embeddings with the image features written over the image tokens' span."""
        text = self.language_model.embed_tokens(torch.where(input_ids == self.image_token_id, 0, input_ids))
        image = self.image_features(pixel_values).to(text.dtype)
        rows = vis_start[:, None] + torch.arange(image.shape[1], device=text.device)
        return text.scatter(1, rows[..., None].expand(-1, -1, text.shape[-1]), image)

    def rope(self, pos, dtype):
        """cos, sin [B, L, head_dim] at integer position ids pos [B, L] (fp32 math, then dtype)."""
        freqs = pos.float()[..., None] * self.inv_freq.to(pos.device)
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _geometry(self, orig, position_ids, valid, dtype):
        """RoPE tables, attention mask and key mask of the current sequence. The sequence is ordered
        by position id, so the causal mask is the index order; every query also sees itself, so a
        padding row never has an empty softmax."""
        cos, sin = self.rope(position_ids.gather(1, orig), dtype)
        key_mask = valid.gather(1, orig)
        n = orig.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=orig.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=orig.device).tril()
        return cos, sin, ((causal & key_mask[:, None, :]) | eye)[:, None], key_mask

    def _select(self, h, orig, vis_start, vis_ids, keep_idx, rest_idx, merge):
        """Keep the chosen tokens of the visual block; merge the rest into `merge` tokens that
        bypass (Eq. 10-11) or, with merge = 0, drop it. Returns h, orig, vis_ids, bypass."""
        M = vis_ids.shape[1]
        block = _visual_block(h, vis_start, M)
        kept_h, kept_ids = _gather_rows(block, keep_idx), vis_ids.gather(1, keep_idx)
        bypass = None
        if merge == 0:
            new_h, new_ids = kept_h, kept_ids
        else:
            rest_h, rest_ids = _gather_rows(block, rest_idx), vis_ids.gather(1, rest_idx)
            merged, group, _ = ops.group_merge(rest_h, merge, backend=self.backend)  # Eq. 10-11
            # a merged token takes its group target's place (and position id)
            ids = torch.cat([kept_ids, rest_ids[:, group_targets(rest_ids.shape[1], merge, h.device)]], 1)
            order = ids.argsort(1)
            new_ids, new_h = ids.gather(1, order), _gather_rows(torch.cat([kept_h, merged], 1), order)
            slots, k = order.argsort(1), kept_ids.shape[1]
            bypass = _Bypass(kept_ids, rest_ids, rest_h, group, merged, slots[:, :k], slots[:, k:])
        return (*_replace_block(h, orig, vis_start, M, new_h, new_ids), new_ids, bypass)

    def _restore(self, h, orig, vis_start, vis_ids, bypass):
        """Before a later SwiftVLM stage: every bypassed token returns, shifted by its group's
        offset (Eq. 12-13); the merged tokens leave. All N_v visual tokens are present again."""
        M, n_vis = vis_ids.shape[1], self.num_visual_tokens
        block = _visual_block(h, vis_start, M)
        full = block.new_empty(block.shape[0], n_vis, block.shape[2])
        kept_rows = bypass.kept_ids[..., None].expand(-1, -1, full.shape[2])
        full.scatter_(1, kept_rows, _gather_rows(block, bypass.kept_slots))
        merged_now = _gather_rows(block, bypass.merged_slots)  # h~^{y-1}_gm
        ops.bypass_align_into(full, bypass.rest_ids, bypass.rest_h, bypass.group, merged_now,
                              bypass.merged_then, backend=self.backend)  # Eq. 12-13
        all_ids = torch.arange(n_vis, device=h.device).expand(h.shape[0], n_vis)
        return (*_replace_block(h, orig, vis_start, M, full, all_ids), all_ids)

    def _prefill(self, input_ids, pixel_values, attention_mask, plan, *, cache_tokens=None,
                 hidden=False, scores=False, stage_scores=None) -> _Prefill:
        """The decoder layers over a sequence that the plan's stages shorten (see the module
        docstring). cache_tokens: keep per-layer KV caches with room for that many new tokens."""
        B, L = input_ids.shape
        n_vis, scale, backend = self.num_visual_tokens, self.head_dim ** -0.5, self.backend
        vis_start = (input_ids == self.image_token_id).int().argmax(1)
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
        h = self.embed(input_ids, pixel_values, vis_start)
        orig = torch.arange(L, device=h.device).expand(B, L)
        vis_ids = torch.arange(n_vis, device=h.device).expand(B, n_vis)
        stages = {st.layer: (s, st) for s, st in enumerate(plan.stages)} if plan else {}
        run = _Prefill(h, orig, kept=[], hidden_states=[] if hidden else None,
                       hidden_index=[] if hidden else None, layer_scores=[] if scores else None)
        bypass = None

        def select(s, st, q_last, k, key_mask):
            """Stage s picks its kept tokens (score_select, or the caller's stage_scores) and applies
            them; returns the new sequence's geometry."""
            nonlocal h, orig, vis_ids, bypass
            if stage_scores is not None and stage_scores[s] is not None:
                keep_idx, rest_idx = ops.topk_select(stage_scores[s].float(), st.keep, backend=backend)
            else:
                keep_idx, rest_idx, _ = ops.score_select(  # Eq. 1-2, then top-k
                    q_last, k, vis_start, vis_ids.shape[1], st.keep, scale, key_mask, backend=backend)
            run.kept.append(vis_ids.gather(1, keep_idx))
            h, orig, vis_ids, bypass = self._select(h, orig, vis_start, vis_ids, keep_idx, rest_idx, st.merge)
            return self._geometry(orig, position_ids, attention_mask, h.dtype)

        cos, sin, mask, key_mask = self._geometry(orig, position_ids, attention_mask, h.dtype)
        for layer_no, layer in enumerate(self.language_model.layers, start=1):
            s, st = stages.get(layer_no, (None, None))
            before = st is not None and plan.bypass and s > 0  # SwiftVLM stage s >= 2 acts before its layer
            if before:
                if bypass is not None:
                    h, orig, vis_ids = self._restore(h, orig, vis_start, vis_ids, bypass)
                    cos, sin, mask, key_mask = self._geometry(orig, position_ids, attention_mask, h.dtype)
                q, k, _ = layer.self_attn.project(layer.input_layernorm(h), cos, sin)
                cos, sin, mask, key_mask = select(s, st, q[:, :, -1], k, key_mask)
            if hidden:
                run.hidden_states.append(h)
                run.hidden_index.append(orig)
            h, q, k, v = layer(h, cos, sin, mask)
            if cache_tokens is not None:
                run.caches.append(KVCache(k, v, key_mask, cache_tokens))
            if scores:
                run.layer_scores.append(ops.tv_score(
                    q[:, :, -1], k, vis_start, vis_ids.shape[1], scale, key_mask, backend=backend))
            if st is not None and not before:  # first / drop-only stage: effective from the next layer
                cos, sin, mask, key_mask = select(s, st, q[:, :, -1], k, key_mask)
        run.h, run.orig = self.language_model.norm(h), orig
        return run

    @torch.no_grad()
    def forward(self, input_ids, pixel_values, attention_mask=None, pruning=None, *,
                output_hidden_states=False, output_scores=False, stage_scores=None) -> LlavaOutput:
        """Prefill logits, with `pruning` (SwiftVLM / FastV / PDrop object, a PruningPlan, or None).

        input_ids [B, L] hold exactly N_v contiguous image tokens per sample (anywhere, after any
        left padding); pixel_values [B, C, S, S]; attention_mask [B, L] (0 = left padding).
        Analysis options: output_hidden_states (each layer's input, with token indices),
        output_scores (each layer's T-V scores of its visual tokens), stage_scores (per stage, fp32
        [B, M] scores of the stage's current visual tokens that replace the model's own, or None).
        """
        plan = self.plan_for(pruning)
        run = self._prefill(*self._check_inputs(input_ids, pixel_values, attention_mask, plan), plan,
                            hidden=output_hidden_states, scores=output_scores, stage_scores=stage_scores)
        logits = self.lm_head(run.h)
        return LlavaOutput(logits, logits[:, -1], run.kept, run.orig, run.hidden_states, run.hidden_index,
                           run.layer_scores)

    # -- decoding -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, pixel_values, attention_mask=None, pruning=None, max_new_tokens=16, *,
                 stage_scores=None) -> Tensor:
        """Greedy decoding after a (pruned) prefill: int64 [B, max_new_tokens]. Every layer attends
        to the keys it kept in the prefill plus the new tokens'; new position ids continue from
        each sample's unpadded prompt length (SPEC property 5). No early stop at EOS."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        plan = self.plan_for(pruning)
        input_ids, pixel_values, attention_mask = self._check_inputs(input_ids, pixel_values, attention_mask, plan)
        run = self._prefill(input_ids, pixel_values, attention_mask, plan, cache_tokens=max_new_tokens - 1,
                            stage_scores=stage_scores)
        token = self.lm_head(run.h[:, -1]).argmax(-1)
        tokens = [token]
        prompt_len = attention_mask.sum(1)
        for t in range(max_new_tokens - 1):
            cos, sin = self.rope((prompt_len + t)[:, None], run.h.dtype)
            h = self.language_model.embed_tokens(token)[:, None]
            for layer, cache in zip(self.language_model.layers, run.caches):
                h = layer(h, cos, sin, None, cache)[0]
            token = self.lm_head(self.language_model.norm(h[:, -1])).argmax(-1)
            tokens.append(token)
        return torch.stack(tokens, 1)


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints
# ---------------------------------------------------------------------------------------------

def canonical_name(key: str) -> str:
    """The model's parameter name for a checkpoint key, for the llava-hf layouts:
    - transformers 4 hub files: language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*
    - transformers 5 save_pretrained: the same, with vision_tower.* (no vision_model.)
    - transformers 5 module names: model.language_model.*, model.vision_tower.*,
      model.multi_modal_projector.*, lm_head.*
    """
    key = key.removeprefix("model.")
    for old, new in (("language_model.lm_head.", "lm_head."), ("language_model.model.", "language_model."),
                     ("vision_tower.vision_model.", "vision_tower.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


class _SafetensorsCheckpoint(Mapping):
    """Checkpoint key -> tensor, read lazily from a directory's safetensors file(s)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map'")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors file (only safetensors checkpoints are read)")
        for name in files:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: shard {name} listed in the index is missing")
        self._handles = [safe_open(str(path / name), framework="pt") for name in files]
        self._where = {key: f for f in self._handles for key in f.keys()}

    def __getitem__(self, key):
        return self._where[key].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)
