"""The unpruned LLaVA forward against HF transformers (docs/semantics.md property 4), the checkpoint layouts, and
padded batches."""
import json

import pytest
import torch
from safetensors.torch import save_file

from swiftvlm_kernels.models.llava import LlavaForward
from swiftvlm_kernels.models.tiny import save_tiny_llava, tiny_inputs, tiny_llava, tiny_llava_config, tiny_tensors

transformers = pytest.importorskip("transformers")


def config_variant(name):
    """The tiny config (GQA 4 / 2 heads, CLS dropped) and variants the loader must also handle."""
    config = tiny_llava_config()
    text = config["text_config"]
    if name == "full":  # CLS feature kept: 37 visual tokens, features from the last CLIP layer
        config["vision_feature_select_strategy"] = "full"
        config["vision_feature_layer"] = -1
    elif name == "mha_llama3":  # one KV head per query head, llama3 RoPE scaling, tied LM head
        text.update(num_key_value_heads=4, tie_word_embeddings=True,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        config["tie_word_embeddings"] = True
    return config


def hf_model(path, dtype=torch.float32, device="cpu"):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def hf_logits(model, inputs):
    position_ids = (inputs["attention_mask"].cumsum(1) - 1).clamp_min(0)  # as our forward: cumsum(mask) - 1
    with torch.no_grad():
        return model(**inputs, position_ids=position_ids).logits


def hf_generate(model, inputs, n):
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[:, -n:]


@pytest.mark.parametrize("variant", ["gqa", "full", "mha_llama3"])
def test_matches_hf_llava(tmp_path, variant):
    """Property 4: the same logits as LlavaForConditionalGeneration on our checkpoint (fp32,
    padded batch, images at different positions), and the same greedy tokens."""
    config = config_variant(variant)
    save_tiny_llava(tmp_path, config=config)
    if variant == "mha_llama3":  # the tied head is not stored
        tensors = tiny_tensors(config)
        del tensors["language_model.lm_head.weight"]
        save_file(tensors, str(tmp_path / "model.safetensors"))
    ours, theirs = LlavaForward.from_pretrained(tmp_path), hf_model(tmp_path)
    inputs = tiny_inputs(3, left_pad=3, config=config)
    valid = inputs["attention_mask"].bool()
    got = ours(**inputs, all_logits=True)
    assert got.logits.shape == (3, inputs["input_ids"].shape[1], 512)
    torch.testing.assert_close(got.logits[valid], hf_logits(theirs, inputs)[valid], atol=1e-4, rtol=0)
    assert torch.equal(got.last_logits, got.logits[:, -1])
    assert torch.equal(ours.generate(**inputs, max_new_tokens=6), hf_generate(theirs, inputs, 6))


def test_loads_transformers_save_pretrained(tmp_path):
    """The layout transformers 5 save_pretrained writes (vision_tower.* without vision_model.)."""
    torch.manual_seed(0)
    theirs = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**tiny_llava_config())).eval()
    theirs.save_pretrained(tmp_path)
    inputs = tiny_inputs(2, left_pad=2)
    valid = inputs["attention_mask"].bool()
    got = LlavaForward.from_pretrained(tmp_path)(**inputs, all_logits=True).logits
    torch.testing.assert_close(got[valid], hf_logits(theirs, inputs)[valid], atol=1e-5, rtol=0)


def test_sharded_checkpoint_in_module_layout(tmp_path):
    """Keys named like transformers 5 modules (model.language_model.*, lm_head.*), two shards
    with an index: the same model as the hub layout."""
    renamed = {}
    for key, t in tiny_tensors().items():
        key = key.replace("language_model.lm_head.", "lm_head.")
        key = key.replace("language_model.model.", "model.language_model.")
        key = key.replace("vision_tower.vision_model.", "model.vision_tower.vision_model.")
        renamed[key.replace("multi_modal_projector.", "model.multi_modal_projector.")] = t
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: renamed[k] for k in part}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(tiny_llava_config()))
    inputs = tiny_inputs(2)
    assert torch.equal(LlavaForward.from_pretrained(tmp_path)(**inputs, all_logits=True).logits, tiny_llava()(**inputs, all_logits=True).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_equals_each_sample_alone(dtype):
    model = tiny_llava(dtype)
    inputs = tiny_inputs(4, left_pad=4)
    batch = model(**inputs, all_logits=True)
    tokens = model.generate(**inputs, max_new_tokens=5)
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    tol = 1e-5
    if dtype == torch.bfloat16:  # other shapes round differently: allow twice bf16's own error against fp32
        exact = tiny_llava()(**inputs, all_logits=True).logits
        tol = 2 * max((batch.logits[b, p:].float() - exact[b, p:]).abs().max().item() for b, p in enumerate(pads))
    for b, pad in enumerate(pads):
        alone = {"input_ids": inputs["input_ids"][b:b + 1, pad:], "pixel_values": inputs["pixel_values"][b:b + 1]}
        single = model(**alone, all_logits=True)
        torch.testing.assert_close(batch.logits[b, pad:].float(), single.logits[0].float(), atol=tol, rtol=0)
        if dtype == torch.float32:  # bf16 near-ties may flip a greedy choice
            assert torch.equal(tokens[b:b + 1], model.generate(**alone, max_new_tokens=5))


def _reduced_precision_check(tmp_path, dtype, device):
    """Our error against the fp32 model is at most twice HF's in the same dtype (the rule the
    flash-attention tests use), plus one bf16 ulp of the logits' scale."""
    save_tiny_llava(tmp_path)
    inputs = {k: v.to(device) for k, v in tiny_inputs(3, left_pad=3).items()}
    valid = inputs["attention_mask"].bool()
    exact = LlavaForward.from_pretrained(tmp_path, device=device)(**inputs, all_logits=True).logits[valid]
    ours = LlavaForward.from_pretrained(tmp_path, dtype=dtype, device=device)(**inputs, all_logits=True).logits[valid].float()
    theirs = hf_logits(hf_model(tmp_path, dtype, device), inputs)[valid].float()
    ours_err, their_err = (ours - exact).abs().max(), (theirs - exact).abs().max()
    assert ours_err <= 2 * their_err + exact.abs().max() * 2 ** -8, (ours_err, their_err)


def test_bfloat16_cpu_error_bounded_by_hf(tmp_path):
    _reduced_precision_check(tmp_path, torch.bfloat16, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_cuda_error_bounded_by_hf(tmp_path, dtype):
    _reduced_precision_check(tmp_path, dtype, "cuda")
