"""llava-hf checkpoints: config.json parsing and validation (with the transformers defaults such files
leave out), RoPE frequencies, and tensors read from safetensors files (never unpickled).

Untrusted files are validated before anything is allocated: config.json's fields (types and ranges),
model.safetensors.index.json's shard names (plain file names inside the checkpoint directory), and
the safetensors headers (shapes and dtypes) against the config. Every problem is a ValueError that
names the file and the field or tensor.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import partial
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
                       tie_word_embeddings=False, max_position_embeddings=4096)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
                "gelu_new": partial(F.gelu, approximate="tanh"), "quick_gelu": _quick_gelu,
                "silu": F.silu, "relu": F.relu}


def activation(name, where):
    if not isinstance(name, str) or name not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


class _Config:
    """Attribute access to a config dict over defaults."""

    def __init__(self, values: Mapping, defaults: Mapping):
        self.__dict__.update(defaults)
        self.__dict__.update({k: v for k, v in values.items() if v is not None or k not in defaults})

    if TYPE_CHECKING:  # fields are the config's keys: typed as Any for the checker
        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...


def _int(where, value, low=1):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{where}: expected an int >= {low}, got {value!r}")
    return int(value)


def _real(where, value, low=0.0, open_low=False):
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < low or (
            open_low and value == low):
        raise ValueError(f"{where}: expected a finite number {'>' if open_low else '>='} {low}, got {value!r}")
    return float(value)


def _bool(where, value):
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value


def _mapping(where, value):
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_config(config: Mapping, source: str = "config"):
    """(llava, vision, text) configs from an HF LLaVA config dict, every field checked for type and
    range; ValueError naming `source` and the field (and for models other than LLaVA)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object (a LLaVA config), got {type(config).__name__}")
    if config.get("model_type") != "llava":
        raise ValueError(f"{source}: not a LLaVA config (expected model_type 'llava', got {config.get('model_type')!r})")
    llava = _Config(config, _LLAVA_DEFAULTS)
    if "image_token_id" in config:  # newer configs spell it this way
        llava.image_token_index = config["image_token_id"]
    vision = _Config(_mapping(f"{source}.vision_config", config.get("vision_config")), _CLIP_DEFAULTS)
    text = _Config(_mapping(f"{source}.text_config", config.get("text_config")), _LLAMA_DEFAULTS)
    if vision.model_type != "clip_vision_model":
        raise ValueError(f"{source}.vision_config: only a CLIP vision tower is supported, "
                         f"got model_type {vision.model_type!r}")
    if text.model_type != "llama":
        raise ValueError(f"{source}.text_config: only a LLaMA decoder is supported, got model_type {text.model_type!r}")

    v, t = f"{source}.vision_config", f"{source}.text_config"
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size"):
        setattr(vision, name, _int(f"{v}.{name}", getattr(vision, name)))
    if vision.patch_size > vision.image_size:
        raise ValueError(f"{v}.patch_size: expected at most image_size = {vision.image_size}, got {vision.patch_size}")
    if vision.hidden_size % vision.num_attention_heads:
        raise ValueError(f"{v}.num_attention_heads: expected a divisor of hidden_size = {vision.hidden_size}, "
                         f"got {vision.num_attention_heads}")
    vision.layer_norm_eps = _real(f"{v}.layer_norm_eps", vision.layer_norm_eps)
    activation(vision.hidden_act, f"{v}.hidden_act")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings"):
        setattr(text, name, _int(f"{t}.{name}", getattr(text, name)))
    kv_heads = text.num_attention_heads if text.num_key_value_heads is None else text.num_key_value_heads
    text.num_key_value_heads = _int(f"{t}.num_key_value_heads", kv_heads)
    if text.num_attention_heads % text.num_key_value_heads:
        raise ValueError(f"{t}: num_attention_heads ({text.num_attention_heads}) is not a "
                         f"multiple of num_key_value_heads ({text.num_key_value_heads})")
    if text.head_dim is None:
        if text.hidden_size % text.num_attention_heads:
            raise ValueError(f"{t}.num_attention_heads: expected a divisor of hidden_size = {text.hidden_size} "
                             f"(head_dim is not given), got {text.num_attention_heads}")
        text.head_dim = text.hidden_size // text.num_attention_heads
    text.head_dim = _int(f"{t}.head_dim", text.head_dim)
    if text.head_dim % 2:
        raise ValueError(f"{t}.head_dim: expected an even number (RoPE rotates pairs), got {text.head_dim}")
    text.rms_norm_eps = _real(f"{t}.rms_norm_eps", text.rms_norm_eps)
    # RoPE's base: > 1 (at or below 1 the frequencies 1 / theta ** (2i / D) are not decreasing, and near 0
    # they overflow fp32: rope_theta = 1e-300 would give inf frequencies and NaN logits)
    text.rope_theta = _real(f"{t}.rope_theta", text.rope_theta, low=1.0, open_low=True)
    for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        setattr(text, name, _bool(f"{t}.{name}", getattr(text, name)))
    activation(text.hidden_act, f"{t}.hidden_act")
    text.rope = _rope_parameters(text, t)

    if isinstance(llava.image_token_index, bool) or not isinstance(llava.image_token_index, Integral) or \
            llava.image_token_index < 0:
        raise ValueError(f"{source}.image_token_index: expected an int >= 0, got {llava.image_token_index!r}")
    activation(llava.projector_hidden_act, f"{source}.projector_hidden_act")
    if llava.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"{source}.vision_feature_select_strategy: expected 'default' or 'full', "
                         f"got {llava.vision_feature_select_strategy!r}")
    layers = llava.vision_feature_layer
    layers = [layers] if isinstance(layers, Integral) and not isinstance(layers, bool) else layers
    depth = vision.num_hidden_layers + 1  # hidden states: embeddings + one per layer
    if not isinstance(layers, list) or not layers or any(
            isinstance(i, bool) or not isinstance(i, Integral) or not -depth <= i < depth for i in layers):
        raise ValueError(f"{source}.vision_feature_layer: expected an index or a list of indices in "
                         f"[{-depth}, {depth - 1}], got {llava.vision_feature_layer!r}")
    llava.feature_layers = [i % depth for i in layers]
    for name in ("multimodal_projector_bias", "tie_word_embeddings"):
        setattr(llava, name, _bool(f"{source}.{name}", getattr(llava, name)))
    llava.tie_word_embeddings = llava.tie_word_embeddings or text.tie_word_embeddings
    return llava, vision, text


def _rope_parameters(text, where) -> dict:
    """The RoPE scaling of the text config, checked: {'rope_type': ..., and its fields}."""
    rope = text.rope_parameters if text.rope_parameters is not None else text.rope_scaling
    rope = dict(_mapping(f"{where}.rope_scaling", rope))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"{where}: RoPE type {kind!r} is not supported (default, linear, llama3)")
    theta = rope.get("rope_theta", text.rope_theta)
    out = {"rope_type": kind, "rope_theta": _real(f"{where}.rope_scaling.rope_theta", theta, low=1.0, open_low=True)}
    if kind in ("linear", "llama3"):
        if "factor" not in rope:
            raise ValueError(f"{where}.rope_scaling.factor: required for RoPE type {kind!r}, missing")
        out["factor"] = _real(f"{where}.rope_scaling.factor", rope["factor"], open_low=True)
    if kind == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if name not in rope:
                raise ValueError(f"{where}.rope_scaling.{name}: required for RoPE type 'llama3', missing")
            out[name] = _real(f"{where}.rope_scaling.{name}", rope[name], open_low=True)
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ValueError(f"{where}.rope_scaling.high_freq_factor: expected more than low_freq_factor = "
                             f"{out['low_freq_factor']}, got {out['high_freq_factor']}")
    return out


def rope_inv_freq(text) -> Tensor:
    """fp32 [head_dim / 2] RoPE inverse frequencies: default, linear or llama3 scaling."""
    rope = text.rope
    dim = text.head_dim
    # on the CPU explicitly: models are built on the meta device
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    if rope["rope_type"] == "default":
        return inv_freq
    if rope["rope_type"] == "linear":
        return inv_freq / rope["factor"]
    # llama3: long wavelengths slowed by `factor`, short kept, a smooth ramp between
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    ramp = (1 - smooth) * slowed / factor + smooth * slowed
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, ramp, slowed)


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


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected {what}") \
            from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected {what}") from None


def read_config(path: Path) -> dict:
    """config.json of a checkpoint directory, as a dict (ValueError naming the file otherwise)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"LLaVA checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not an HF-format checkpoint directory)")
    config = _read_json(config_file, "a JSON object (a LLaVA config)")
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object (a LLaVA config), got a JSON {type(config).__name__}")
    return config


_SHARD = re.compile(r"[^/\\]+\.safetensors")


class SafetensorsCheckpoint(Mapping):
    """Checkpoint key -> tensor, read lazily from a directory's safetensors file(s). Opening reads the
    headers only; `shape(key)` and `dtype(key)` come from them, without loading a tensor."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            data = _read_json(index, "a JSON object with a 'weight_map'")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError(f"{index}: expected a 'weight_map' object from tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            for name in files:  # plain file names inside the directory, never a path out of it
                if not _SHARD.fullmatch(name) or name in (".safetensors", "..safetensors") or name.startswith(".."):
                    raise ValueError(f"{index}: shard {name!r}: expected a plain *.safetensors file name inside "
                                     f"{path} (no directory, no '..', not absolute)")
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors file (only safetensors checkpoints are read)")
        for name in files:
            if not (path / name).is_file():  # a symlink (the HF cache layout) is followed
                raise FileNotFoundError(f"{path}: shard {name} listed in the index is missing")
        self.path = path
        self._handles = {}
        self._where = {}
        for name in files:
            try:
                handle = safe_open(str(path / name), framework="pt")
            except Exception as e:  # a corrupt or non-safetensors file
                raise ValueError(f"{path / name}: not a readable safetensors file ({e})") from None
            self._handles[name] = handle
            for key in handle.keys():
                if key in self._where:
                    raise ValueError(f"{path / name}: tensor {key!r} is also in {self._where[key][0]}")
                self._where[key] = (name, handle)

    def shape(self, key) -> tuple:
        return tuple(self._where[key][1].get_slice(key).get_shape())

    def dtype(self, key) -> str:
        return self._where[key][1].get_slice(key).get_dtype()

    def file(self, key) -> str:
        return str(self.path / self._where[key][0])

    def __getitem__(self, key):
        return self._where[key][1].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


_FLOAT_HEADER = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_LAYER = re.compile(r"(language_model|vision_tower\.encoder)\.layers\.(\d+)\.")


def canonical_keys(tensors) -> dict:
    """Model parameter name -> checkpoint key; ValueError when one weight is present under two keys."""
    names = {}
    for key in tensors:
        name = canonical_name(key)
        if name in names:
            raise ValueError(f"checkpoint: the weight {name!r} is present twice, as {names[name]!r} and {key!r} "
                             "(two key layouts mixed)")
        names[name] = key
    return names


def check_against_config(tensors, config: Mapping, source: str = "config") -> None:
    """Refuse a checkpoint that disagrees with its config before anything is allocated: the layer
    counts and the sizes that set every other shape (vocab, widths, heads, patches), from the
    safetensors headers (`tensors` needs .shape(key); other mappings are checked as tensors)."""
    llava, vision, text = parse_config(config, source)
    names = canonical_keys(tensors)

    def shape(name):
        key = names.get(name)
        if key is None:
            return None
        return tensors.shape(key) if hasattr(tensors, "shape") else tuple(tensors[key].shape)

    def expect(name, want, fields):
        got = shape(name)
        if got is not None and got != tuple(want):
            raise ValueError(f"checkpoint tensor {names[name]}: shape {list(got)} does not match {source} "
                             f"({fields} give {list(want)})")

    found = {"language_model": set(), "vision_tower.encoder": set()}
    for name in names:
        m = _LAYER.match(name)
        if m:
            found[m.group(1)].add(int(m.group(2)))
    text_layers = found["language_model"]
    if text_layers and text_layers != set(range(text.num_hidden_layers)):
        raise ValueError(f"{source}.text_config.num_hidden_layers: {text.num_hidden_layers}, but the checkpoint "
                         f"holds layers {_ranges(text_layers)}")
    needed = max(llava.feature_layers)
    if found["vision_tower.encoder"] and not set(range(needed)) <= found["vision_tower.encoder"]:
        raise ValueError(f"{source}.vision_config: the features come from vision layer {needed}, but the "
                         f"checkpoint holds vision layers {_ranges(found['vision_tower.encoder'])}")
    t, v = "text_config", "vision_config"
    expect("language_model.embed_tokens.weight", (text.vocab_size, text.hidden_size),
           f"{t}.vocab_size and {t}.hidden_size")
    expect("lm_head.weight", (text.vocab_size, text.hidden_size), f"{t}.vocab_size and {t}.hidden_size")
    expect("language_model.layers.0.self_attn.q_proj.weight", (text.num_attention_heads * text.head_dim,
                                                               text.hidden_size),
           f"{t}.num_attention_heads x head_dim and hidden_size")
    expect("language_model.layers.0.self_attn.k_proj.weight", (text.num_key_value_heads * text.head_dim,
                                                               text.hidden_size),
           f"{t}.num_key_value_heads x head_dim and hidden_size")
    expect("language_model.layers.0.mlp.gate_proj.weight", (text.intermediate_size, text.hidden_size),
           f"{t}.intermediate_size and hidden_size")
    expect("vision_tower.embeddings.patch_embedding.weight",
           (vision.hidden_size, vision.num_channels, vision.patch_size, vision.patch_size),
           f"{v}.hidden_size, num_channels and patch_size")
    expect("vision_tower.embeddings.position_embedding.weight",
           ((vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size),
           f"{v}.image_size / patch_size and hidden_size")
    expect("multi_modal_projector.linear_1.weight", (text.hidden_size, vision.hidden_size * len(llava.feature_layers)),
           f"{t}.hidden_size and {v}.hidden_size")


def _ranges(values) -> str:
    values = sorted(values)
    return f"{values[0]}..{values[-1]} ({len(values)} layers)"


def check_tensor_dtype(tensors, key) -> None:
    """A floating-point tensor where the model holds weights (int or bool is refused)."""
    if hasattr(tensors, "dtype"):
        dtype = tensors.dtype(key)
        if dtype not in _FLOAT_HEADER:
            raise ValueError(f"checkpoint tensor {key} ({tensors.file(key)}): expected a floating-point dtype, got {dtype}")
    else:
        t = tensors[key]
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"checkpoint tensor {key}: expected a floating-point torch.Tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
