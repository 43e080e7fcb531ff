"""Clear errors from the LLaVA loader, the input checks and pruning plans."""
import json

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
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_1\.weight: shape \(64, 31\).*\(64, 32\)"):
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
    with pytest.raises(ValueError, match="sample 1 has 35 image tokens .* gives 36 features"):
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
    with pytest.raises(ValueError, match=r"pixel_values: expected shape \[2, 3, 84, 84\]"):
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
    with pytest.raises(ValueError, match="plan is for n_vis = 576, num_layers = 32; this model has 36"):
        model(**tiny_inputs(1), pruning=plan)
