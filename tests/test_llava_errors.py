"""Clear errors from the LLaVA loader, the input checks and pruning plans."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from swiftvlm_kernels.models.llava import LlavaForward
from swiftvlm_kernels.pruning import FastV, PDrop, PruningPlan, Stage, SwiftVLM
from swiftvlm_kernels.models.tiny import save_tiny_llava, tiny_inputs, tiny_llava, tiny_llava_config, tiny_tensors


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def write_checkpoint(path, config=None, tensors=None):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or tiny_llava_config()))
    save_file(tiny_tensors() if tensors is None else tensors, str(path / "model.safetensors"))
    return path


# -- checkpoints ----------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        LlavaForward.from_pretrained(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    save_file(tiny_tensors(), str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LlavaForward.from_pretrained(tmp_path)


def test_not_a_llava_config(tmp_path):
    write_checkpoint(tmp_path, config=tiny_llava_config()["text_config"])
    with pytest.raises(ValueError, match="not a LLaVA config.*'llama'"):
        LlavaForward.from_pretrained(tmp_path)


@pytest.mark.parametrize("part, change, message", [
    ("vision_config", {"model_type": "siglip_vision_model"}, "only a CLIP vision tower"),
    ("text_config", {"model_type": "mistral"}, "only a LLaMA decoder"),
    ("text_config", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "RoPE type 'yarn'"),
    ("text_config", {"hidden_act": "swiglu_fancy"}, "activation 'swiglu_fancy'"),
    ("text_config", {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    (None, {"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy"),
    (None, {"vision_feature_layer": 7}, "vision_feature_layer"),
])
def test_unsupported_config(part, change, message):
    config = tiny_llava_config()
    (config[part] if part else config).update(change)
    with pytest.raises(ValueError, match=message):
        LlavaForward.from_config(config)


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llava_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickled weights are never read")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        LlavaForward.from_pretrained(tmp_path)


def test_index_names_a_missing_shard(tmp_path):
    write_checkpoint(tmp_path)
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        LlavaForward.from_pretrained(tmp_path)


def test_missing_tensor(tmp_path):
    tensors = tiny_tensors()
    del tensors["language_model.model.layers.7.mlp.up_proj.weight"]
    write_checkpoint(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=r"1 tensors missing: language_model\.layers\.7\.mlp\.up_proj\.weight"):
        LlavaForward.from_pretrained(tmp_path)


def test_mismatched_tensor(tmp_path):
    tensors = tiny_tensors()
    tensors["multi_modal_projector.linear_1.weight"] = torch.zeros(64, 31)
    write_checkpoint(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_1\.weight: shape \[64, 31\] does not match .*config\.json .*give \[64, 32\]"):
        LlavaForward.from_pretrained(tmp_path)


def test_not_a_llava_checkpoint(tmp_path):
    write_checkpoint(tmp_path, tensors={"encoder.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="no LLaVA tensor found"):
        LlavaForward.from_pretrained(tmp_path)


def test_saved_tiny_checkpoint_loads(tmp_path):
    """The positive control of the cases above."""
    save_tiny_llava(tmp_path)
    inputs = tiny_inputs(1)
    assert torch.equal(LlavaForward.from_pretrained(tmp_path)(**inputs, all_logits=True).logits, tiny_llava()(**inputs, all_logits=True).logits)


# -- inputs -----------------------------------------------------------------------------------------

def test_image_token_count_mismatch(model):
    inputs = tiny_inputs(2)
    inputs["input_ids"][1, inputs["input_ids"][1].tolist().index(511)] = 7
    with pytest.raises(ValueError, match="sample 1 has 35 image tokens .* expected a positive multiple of 36"):
        model(**inputs, all_logits=True)


def test_image_tokens_not_contiguous(model):
    inputs = tiny_inputs(1)
    ids = inputs["input_ids"][0]
    first = ids.tolist().index(511)
    ids[first + 3], ids[first + 36] = ids[first + 36].item(), 511  # move one image token past the span
    with pytest.raises(ValueError, match="not contiguous"):
        model(**inputs, all_logits=True)


def test_wrong_image_size(model):
    inputs = tiny_inputs(2)
    inputs["pixel_values"] = torch.zeros(2, 3, 56, 56)
    with pytest.raises(ValueError, match=r"pixel_values: expected a float tensor of shape \[I, 3, 84, 84\] with I >= 2"):
        model(**inputs, all_logits=True)


def test_right_padding(model):
    inputs = tiny_inputs(2)
    inputs["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="only left padding"):
        model(**inputs, all_logits=True)


def test_pruning_needs_a_text_token_after_the_image(model):
    inputs = tiny_inputs(1, text_len=2)
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:, :-1], inputs["attention_mask"][:, :-1]
    model(**inputs, all_logits=True)  # unpruned: fine
    with pytest.raises(ValueError, match="ends with the image"):
        model(**inputs, all_logits=True, pruning=FastV())


def test_max_new_tokens(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(**tiny_inputs(1), max_new_tokens=0)


# -- pruning plans ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: SwiftVLM(layers=(3, 11, 17)), r"layers: stage 3 \(layer 17\).*\[1, 16\]"),
    (lambda: FastV(layer=16), r"layers: stage 1 \(layer 16\).*\[1, 15\]"),
    (lambda: SwiftVLM(layers=(11, 3, 15)), "strictly increasing"),
    (lambda: PDrop(layers=(3, 3, 8)), "strictly increasing"),
    (lambda: FastV(keep=37), "keep"),
    (lambda: SwiftVLM(keep=(5, 40, 5)), r"keep\[1\]"),
    (lambda: PDrop(layers=(3, 8, 12), keep=(10, 20, 5)), "non-increasing"),
])
def test_bad_pruning(model, make, message):
    with pytest.raises(ValueError, match=message):
        model(**tiny_inputs(1), pruning=make())


def test_plan_for_another_model(model):
    plan = PruningPlan("fastv", 576, 32, (Stage(2, 192, 0),), bypass=False)
    with pytest.raises(ValueError, match="plan is for n_vis = 576, num_layers = 32; these inputs have 36"):
        model(**tiny_inputs(1), pruning=plan)


# -- untrusted files: checked before anything is allocated --------------------------------------------

def _config(**changes):
    config = tiny_llava_config()
    for path, value in changes.items():
        part, _, field = path.rpartition("__")
        (config[part] if part else config)[field] = value
    return config


@pytest.mark.parametrize("changes, message", [
    ({"text_config__rope_theta": 0}, r"text_config\.rope_theta: expected a finite number > 1"),
    ({"text_config__rope_theta": 1e-300}, r"text_config\.rope_theta: expected a finite number > 1"),
    ({"text_config__rope_theta": 1.0}, r"text_config\.rope_theta: expected a finite number > 1"),
    ({"text_config__rope_theta": -5.0}, r"text_config\.rope_theta"),
    ({"text_config__rms_norm_eps": -1e-6}, r"text_config\.rms_norm_eps: expected a finite number >= 0"),
    ({"text_config__rope_scaling": {"rope_type": "linear", "factor": 0}}, r"rope_scaling\.factor: expected a finite number > 0"),
    ({"text_config__rope_scaling": {"rope_type": "linear"}}, r"rope_scaling\.factor: required"),
    ({"text_config__rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling\.low_freq_factor: required"),
    ({"text_config__num_attention_heads": 0}, r"text_config\.num_attention_heads: expected an int >= 1"),
    ({"text_config__num_key_value_heads": 0}, r"text_config\.num_key_value_heads: expected an int >= 1"),
    ({"vision_config__patch_size": 0}, r"vision_config\.patch_size: expected an int >= 1"),
    ({"vision_config__patch_size": 100}, r"vision_config\.patch_size: expected at most image_size"),
    ({"text_config__hidden_size": "64"}, r"text_config\.hidden_size: expected an int >= 1, got '64'"),
    ({"text_config__vocab_size": True}, r"text_config\.vocab_size: expected an int >= 1, got True"),
    ({"image_token_index": "511"}, r"image_token_index: expected an int >= 0, got '511'"),
    ({"text_config": [1, 2]}, r"text_config: expected a JSON object, got list"),
    ({"text_config__max_position_embeddings": 0}, r"max_position_embeddings: expected an int >= 1"),
])
def test_impossible_config_values(tmp_path, changes, message):
    write_checkpoint(tmp_path, config=_config(**changes))
    with pytest.raises(ValueError, match=message):
        LlavaForward.from_pretrained(tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"text_config__num_hidden_layers": 15}, r"num_hidden_layers: 15, but the checkpoint holds layers 0\.\.15"),
    ({"text_config__num_hidden_layers": 100000}, r"num_hidden_layers: 100000, but the checkpoint holds layers"),
    ({"text_config__vocab_size": 30_000_000}, r"embed_tokens\.weight: shape \[512, 64\] does not match .*vocab_size"),
    ({"text_config__hidden_size": 128, "text_config__head_dim": 32}, r"shape \[512, 64\] does not match"),
    ({"text_config__intermediate_size": 96}, r"gate_proj\.weight: shape \[128, 64\].*intermediate_size"),
    ({"vision_config__image_size": 112}, r"position_embedding\.weight: shape \[37, 32\].*image_size"),
    ({"text_config__num_key_value_heads": 4}, r"k_proj\.weight: shape \[32, 64\].*num_key_value_heads"),
])
def test_config_that_disagrees_with_the_checkpoint_is_refused_before_allocating(tmp_path, changes, message):
    import time

    write_checkpoint(tmp_path, config=_config(**changes))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        LlavaForward.from_pretrained(tmp_path)
    assert time.perf_counter() - t0 < 5  # refused from the headers, not after building 100,000 layers


def test_non_float_tensor_and_duplicate_layouts(tmp_path):
    tensors = tiny_tensors()
    tensors["language_model.model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    write_checkpoint(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=r"language_model\.model\.norm\.weight .*expected a floating-point dtype, got I64"):
        LlavaForward.from_pretrained(tmp_path)
    tensors = tiny_tensors()
    tensors["model.language_model.norm.weight"] = tensors["language_model.model.norm.weight"].clone()  # other layout
    write_checkpoint(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=r"the weight 'language_model\.norm\.weight' is present twice"):
        LlavaForward.from_pretrained(tmp_path)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"config\.json: not valid JSON"),
    ("[1, 2, 3]", r"config\.json: expected a JSON object \(a LLaVA config\), got a JSON list"),
])
def test_unreadable_config(tmp_path, content, message):
    write_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        LlavaForward.from_pretrained(tmp_path)


@pytest.mark.parametrize("shard", ["/etc/passwd.safetensors", "../outside.safetensors", "sub/dir.safetensors",
                                   "model.bin", "..\\\\x.safetensors"])
def test_index_shard_names_stay_inside_the_directory(tmp_path, shard):
    write_checkpoint(tmp_path)
    index = {"weight_map": {"lm_head.weight": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: shard .*expected a plain \*\.safetensors file name"):
        LlavaForward.from_pretrained(tmp_path)


def test_index_that_is_not_json(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("weight_map = 3")
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON"):
        LlavaForward.from_pretrained(tmp_path)


def test_symlinked_shards_load(tmp_path):
    """The Hugging Face cache layout: snapshot files are symlinks into ../../blobs."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    save_tiny_llava(blobs)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(Path("../..") / "blobs" / name)
    inputs = tiny_inputs(1)
    assert torch.equal(LlavaForward.from_pretrained(snapshot)(**inputs).last_logits, tiny_llava()(**inputs).last_logits)


# -- inputs and arguments -------------------------------------------------------------------------------

def test_bad_input_ids(model):
    inputs = tiny_inputs(1)
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 512\)"):
        model(**{**inputs, "input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == 5, 900)}
              if (inputs["input_ids"] == 5).any() else {**inputs, "input_ids": torch.cat(
                  [inputs["input_ids"][:, :-1], torch.tensor([[900]])], 1)})
    with pytest.raises(ValueError, match=r"input_ids: expected an int64 or int32 tensor"):
        model(**{**inputs, "input_ids": inputs["input_ids"].to(torch.uint8)})
    with pytest.raises(ValueError, match=r"input_ids: expected at least one sample"):
        model(inputs["input_ids"][:0], inputs["pixel_values"][:0])


def test_pruning_of_the_wrong_kind(model):
    with pytest.raises(ValueError, match=r"pruning: expected None, a PruningPlan, a RaggedPlan or a pruning method .* got str"):
        model(**tiny_inputs(1), pruning="swiftvlm")
    with pytest.raises(ValueError, match=r"pruning: the swiftvlm ops take float32, float16 or bfloat16"):
        tiny_llava(torch.float64)(**tiny_inputs(1), pruning=FastV())
    assert tiny_llava(torch.float64)(**tiny_inputs(1)).last_logits.dtype == torch.float64  # unpruned: fine


def test_stage_scores_must_fit_the_plan(model):
    inputs = tiny_inputs(2)
    plan = model.plan_for(PDrop(layers=(3, 8, 12), keep=(20, 10, 4)))
    good = [torch.rand(2, 36), torch.rand(2, 20), None]
    model(**inputs, pruning=plan, stage_scores=good)
    for scores, message in (
            (good[:2], r"stage_scores: expected a list of 3 entries"),
            ([torch.rand(2, 35), None, None], r"stage_scores\[0\]: expected a float tensor of shape \[2, 36\]"),
            ([torch.rand(1, 36), None, None], r"stage_scores\[0\].*\[2, 36\]"),
            ([None, torch.rand(2, 36), None], r"stage_scores\[1\]: expected a float tensor of shape \[2, 20\]"),
            ([None, None, torch.ones(2, 10, dtype=torch.int64)], r"stage_scores\[2\].*got \[2, 10\] torch\.int64")):
        with pytest.raises(ValueError, match=message):
            model(**inputs, pruning=plan, stage_scores=scores)
    with pytest.raises(ValueError, match="stage_scores: given without pruning"):
        model(**inputs, stage_scores=good)


def test_generation_length_and_cache_memory(model):
    inputs = tiny_inputs(1)
    L = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"max_new_tokens: the prompt's 48 tokens and 465 new ones exceed "
                                         r"max_position_embeddings = 512 of the config; expected at most 464"):
        model.generate(**inputs, max_new_tokens=512 - L + 1)
    from swiftvlm_kernels.models import llava

    sizes = []
    original = llava.KVCache.append

    def record(self, k, v):
        out = original(self, k, v)
        sizes.append(self.k.shape[1])
        return out

    llava.KVCache.append = record
    try:
        model.generate(**inputs, max_new_tokens=5)
    finally:
        llava.KVCache.append = original
    assert max(sizes) <= L + llava.KVCache.GROWTH  # grown with the tokens made, not preallocated for a bound
