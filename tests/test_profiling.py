"""The Sec. 3.2 layer profile on the tiny model."""
import pytest
import torch

from swiftvlm_kernels.models.tiny import tiny_inputs, tiny_llava
from swiftvlm_kernels.pruning import layer_profile, select_pruning_layers


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def samples():
    return [tiny_inputs(2, left_pad=2, seed=1), tiny_inputs(1, seed=2)]


def agreement(model):
    """Metric: minus the KL divergence of the run's last-token distribution from the vanilla one."""
    def metric(sample, output):
        p = model(**sample).last_logits.log_softmax(-1)
        return -torch.nn.functional.kl_div(output.last_logits.log_softmax(-1), p, log_target=True,
                                           reduction="batchmean").item()
    return metric


def test_each_layer_selects_its_own_top_tokens(model):
    """Run i keeps, from layer 3 on, the top tokens of layer i's own T-V scores in the vanilla
    forward (recomputed here from that layer's input, query and keys)."""
    seen = []
    layer_profile(model, samples()[:1], lambda sample, output: seen.append(output.kept[0]) or 0.0, keep_ratio=0.25)
    sample = samples()[0]
    vanilla = model(**sample, output_hidden_states=True)
    vis_start = (sample["input_ids"] == model.image_token_id).int().argmax(1)
    position_ids = (sample["attention_mask"].cumsum(1) - 1).clamp_min(0)
    cos, sin = model.rope_table(position_ids, torch.float32).unbind(2)
    for i, layer in enumerate(model.language_model.layers):
        x = layer.input_layernorm(vanilla.hidden_states[i])
        q, k = layer.self_attn.query(x, cos, sin), layer.self_attn.keys(x, cos, sin)
        scores = torch.ops.swiftvlm.tv_score(q[:, -1], k.transpose(1, 2), vis_start, 36, 0.25,
                                             sample["attention_mask"].bool())
        assert torch.equal(seen[i], torch.ops.swiftvlm.topk_select(scores, 9)[0])


def test_profile_values(model):
    metric = agreement(model)
    full = layer_profile(model, samples(), metric, keep_ratio=1.0)
    assert full == pytest.approx([0.0] * 16, abs=1e-6)  # every token kept: the vanilla output
    profile = layer_profile(model, samples(), metric, keep_ratio=0.25)
    assert len(profile) == 16 and all(x <= 1e-6 for x in profile)
    assert len(set(round(x, 6) for x in profile)) > 4  # layers differ in what they select
    layers = select_pruning_layers(profile, 3)
    assert all(3 <= i <= 16 for i in layers) and layers == sorted(layers)


def test_profile_with_generation(model):
    seen = []
    profile = layer_profile(model, samples()[1:], lambda sample, ids: seen.append(ids.shape) or 1.0, max_new_tokens=3)
    assert profile == [1.0] * 16 and seen == [(1, 3)] * 16


def test_bad_keep_ratio(model):
    with pytest.raises(ValueError, match="keep_ratio"):
        layer_profile(model, samples(), lambda s, o: 0.0, keep_ratio=0.0)
