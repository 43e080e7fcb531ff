"""llava-hf checkpoints: config.json parsing (with the transformers defaults such files leave out),
RoPE frequencies, and tensors read from safetensors files (never unpickled)."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

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


def activation(name, where):
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


class SafetensorsCheckpoint(Mapping):
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


def read_config(path: Path) -> dict:
    """config.json of a checkpoint directory, as a dict."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"LLaVA checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not an HF-format checkpoint directory)")
    return json.loads(config_file.read_text())
