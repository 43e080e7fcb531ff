"""A tiny LLaVA with seeded random weights: tests and the demo run the real model code without
downloading anything.

CLIP tower: 84 px images, 14 px patches -> 36 visual tokens (37 with the 'full' strategy), 3 layers
of width 32. LLaMA decoder: 16 layers (the default SwiftVLM layers 3, 11, 15 fit), width 64,
4 query heads sharing 2 KV heads (GQA), vocabulary 512 with the image token 511.
Query/key weights are drawn larger than 1/sqrt(fan_in) so attention is peaked, not uniform, and
the choice of visual tokens changes the output.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint import parse_config
from .llava import CLIPVisionTower, LlavaForward

QK_GAIN = 2.0  # attention logits with std of a few units: peaked rows, distinct token scores


def tiny_llava_config() -> dict:
    """The tiny model's config.json content (llava-hf format)."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 511,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 2, "num_channels": 3, "image_size": 84,
            "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32,
        },
        "text_config": {
            "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
            "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        },
    }


def hub_key(name: str) -> str:
    """The llava-hf checkpoint key of a LlavaForward parameter name."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    for ours, hub in (("language_model.", "language_model.model."), ("vision_tower.", "vision_tower.vision_model.")):
        if name.startswith(ours):
            return hub + name[len(ours):]
    return name


def _draw(name, shape, gen):
    """A seeded random tensor for one parameter (fp32)."""
    noise = torch.randn(shape, generator=gen)
    if name.endswith("bias"):
        return 0.02 * noise
    if "norm" in name:  # LayerNorm / RMSNorm gains near 1
        return 1 + 0.1 * noise
    if "embed_tokens" in name or "class_embedding" in name or "position_embedding" in name:
        return noise
    fan_in = math.prod(shape[1:])
    gain = QK_GAIN if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
    return gain * noise / math.sqrt(fan_in)


def tiny_tensors(config=None, seed=0) -> dict:
    """A complete llava-hf checkpoint for `config` (default: the tiny one): key -> fp32 tensor.
    It holds every CLIP layer and the post-layernorm too, like the published checkpoints."""
    config = config or tiny_llava_config()
    vision = parse_config(config)[1]
    with torch.device("meta"):
        model = LlavaForward(config)
        tower = CLIPVisionTower(vision, vision.num_hidden_layers)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    shapes.update({"vision_tower." + name: p.shape for name, p in tower.named_parameters()})
    for part in ("weight", "bias"):
        shapes["vision_tower.post_layernorm." + part] = (vision.hidden_size,)
    gen = torch.Generator().manual_seed(seed)
    return {hub_key(name): _draw(name, shapes[name], gen) for name in sorted(shapes)}


def tiny_llava(dtype=torch.float32, device="cpu", seed=0, config=None) -> LlavaForward:
    """The tiny LLaVA (or `config`) with seeded random weights."""
    config = config or tiny_llava_config()
    model = LlavaForward.from_config(config, dtype, device)
    model.load_tensors(tiny_tensors(config, seed))
    return model


def save_tiny_llava(path, seed=0, config=None) -> Path:
    """Write config.json + model.safetensors (llava-hf layout) for the tiny model to `path`."""
    from safetensors.torch import save_file

    config = config or tiny_llava_config()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tiny_tensors(config, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def tiny_inputs(batch=2, *, text_len=12, left_pad=0, seed=0, config=None, device="cpu") -> dict:
    """input_ids / pixel_values / attention_mask for the tiny model (or `config`).

    Every sample has text_len text tokens around its image, the image after a different number of
    them (at least one text token before and after it); with left_pad > 0, every odd sample is
    left-padded by left_pad tokens (and has left_pad fewer text tokens).
    """
    config = config or tiny_llava_config()
    llava, vision, text = parse_config(config)
    n_vis = (vision.image_size // vision.patch_size) ** 2 + (llava.vision_feature_select_strategy == "full")
    if not 0 <= left_pad <= text_len - 2:
        raise ValueError(f"left_pad: expected in [0, text_len - 2 = {text_len - 2}], got {left_pad}")
    gen = torch.Generator().manual_seed(seed)
    L = text_len + n_vis
    input_ids = torch.zeros(batch, L, dtype=torch.long)
    attention_mask = torch.ones(batch, L, dtype=torch.long)
    for b in range(batch):
        pad = left_pad if b % 2 else 0
        n_text = text_len - pad
        before = 1 + (3 * b) % (n_text - 1)
        words = torch.randint(3, text.vocab_size, (n_text,), generator=gen)
        words = torch.where(words == llava.image_token_index, 3, words)
        input_ids[b, pad:] = torch.cat([words[:before], torch.full((n_vis,), llava.image_token_index), words[before:]])
        attention_mask[b, :pad] = 0
    pixel_values = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
    return {"input_ids": input_ids.to(device), "pixel_values": pixel_values.to(device),
            "attention_mask": attention_mask.to(device)}
