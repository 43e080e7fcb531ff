"""docs/semantics.md properties 1, 2, 3 and 5 of the pruned LLaVA prefill and its generation, on the tiny model."""
import pytest
import torch

from swiftvlm_kernels.pruning import FastV, PDrop, SwiftVLM
from swiftvlm_kernels.models.tiny import tiny_inputs, tiny_llava
from bench.host import tiny_ragged_inputs as ragged_inputs  # noqa: F401  (test_alvts imports it from here)

N_V = 36  # the tiny model's visual tokens
PLANS = {
    "swiftvlm": SwiftVLM(),  # layers 3, 11, 15; budget N_v / 3 -> keep 5, merge 2
    "swiftvlm_explicit": SwiftVLM(layers=(4, 9, 16), keep=(12, 20, 4), merge=(6, 3)),
    "fastv": FastV(keep=9),
    "pdrop": PDrop(layers=(3, 8, 12), keep=(20, 10, 4)),
}
DROP_ONLY = {
    "fastv": FastV(keep=9),
    "fastv_late": FastV(layer=9, keep=3),
    "pdrop": PDrop(layers=(3, 8, 12), keep=(20, 10, 4)),
    # Z = R at every non-final stage: nothing is merged away, so SwiftVLM is a drop at its last layer
    "swiftvlm_singletons": SwiftVLM(keep=(5, 7, 6), merge=(N_V - 5, N_V - 7)),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def inputs():
    return tiny_inputs(4, left_pad=3)


def masked_forward(model, input_ids, pixel_values, attention_mask, plan, masks=None):
    """The masking formulation (property 3): the unpruned model on the full sequence, in which the
    tokens a stage drops are masked out as keys from the layer where the stage takes effect on,
    positions kept. Stages that merge into singletons (Z = R) keep every token. `masks` (per-layer
    key masks of an earlier call) replays that call's selections. Returns (logits, masks)."""
    n_vis, scale = model.num_visual_tokens, model.head_dim ** -0.5
    L = input_ids.shape[1]
    vis_start = (input_ids == model.image_token_id).int().argmax(1)
    rows = vis_start[:, None] + torch.arange(n_vis)
    h = model.embed(input_ids, pixel_values, vis_start)
    cos, sin = model.rope_table((attention_mask.cumsum(1) - 1).clamp_min(0), h.dtype).unbind(2)
    causal_or_self = torch.ones(L, L, dtype=torch.bool).tril(), torch.eye(L, dtype=torch.bool)
    stages = {st.layer: (s, st) for s, st in enumerate(plan.stages)}
    alive, used = attention_mask.bool(), []

    def drop(alive, q, k, keep):  # q [B, L, H, D], k [B, L, Hkv, D]
        scores = torch.ops.swiftvlm.tv_score(q[:, -1], k.transpose(1, 2), vis_start, n_vis, scale, alive)
        scores = scores.masked_fill(~alive.gather(1, rows), float("-inf"))  # only survivors compete
        _, rest = torch.ops.swiftvlm.topk_select(scores, keep)
        return alive.scatter(1, rows.gather(1, rest), False)

    for layer_no, layer in enumerate(model.language_model.layers, start=1):
        s, st = stages.get(layer_no, (None, None))
        acts = masks is None and st is not None and st.merge == 0
        before = acts and plan.bypass and s > 0
        if before:
            x = layer.input_layernorm(h)
            alive = drop(alive, layer.self_attn.query(x, cos, sin), layer.self_attn.keys(x, cos, sin), st.keep)
        keys = alive if masks is None else masks[layer_no - 1]
        used.append(keys)
        attn = (causal_or_self[0] & keys[:, None, :]) | causal_or_self[1]
        h, q, k, _ = layer(h, cos, sin, attn[:, None])
        if acts and not before:
            alive = drop(alive, q, k, st.keep)
    return model.lm_head(model.language_model.norm(h)), used


def masked_generate(model, inputs, plan, n):
    """Greedy decoding in the masking formulation: re-run the full sequence per token, with the
    prompt's per-layer key masks (new tokens are valid keys everywhere)."""
    ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    with torch.no_grad():
        logits, masks = masked_forward(model, ids, pixels, mask, plan)
        tokens = []
        for _ in range(n):
            tokens.append(logits[:, -1].argmax(-1))
            ids, mask = torch.cat([ids, tokens[-1][:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            masks = [torch.cat([m, torch.ones_like(m[:, :1])], 1) for m in masks]
            logits, _ = masked_forward(model, ids, pixels, mask, plan, masks)
    return torch.stack(tokens, 1)


def rows_that_reach_the_end(out, inputs):
    """The pruned logits rows of non-padding tokens, every row's input position, and the row mask."""
    valid = inputs["attention_mask"].bool().gather(1, out.token_index)
    return out.logits[valid], out.token_index, valid


@pytest.mark.parametrize("pruning", [SwiftVLM(keep=(N_V,) * 3), FastV(keep=N_V),
                                     PDrop(layers=(3, 8, 12), keep=(N_V,) * 3)], ids=["swiftvlm", "fastv", "pdrop"])
def test_keep_all_equals_vanilla(model, inputs, pruning):
    """Property 1: keeping every visual token at every stage gives the unpruned logits."""
    vanilla, pruned = model(**inputs, all_logits=True), model(**inputs, all_logits=True, pruning=pruning)
    assert pruned.logits.shape == vanilla.logits.shape
    torch.testing.assert_close(pruned.logits, vanilla.logits, atol=1e-6, rtol=0)
    for kept in pruned.kept:
        assert torch.equal(kept, torch.arange(N_V).expand(4, N_V))
    tokens = model.generate(**inputs, pruning=pruning, max_new_tokens=4)
    assert torch.equal(tokens, model.generate(**inputs, max_new_tokens=4))


def test_singleton_groups_restore_the_unpruned_hidden_states(model, inputs):
    """Property 2: with Z = R, the hidden states entering the second (and third) pruning layer
    are the unpruned forward's; with real groups they are not (the bypass approximates)."""
    vanilla = model(**inputs, all_logits=True, output_hidden_states=True)
    exact = model(**inputs, all_logits=True, pruning=SwiftVLM(keep=(5, 7, 6), merge=(N_V - 5, N_V - 7)), output_hidden_states=True)
    merged = model(**inputs, all_logits=True, pruning=SwiftVLM(keep=(5, 7, 6), merge=(3, 3)), output_hidden_states=True)
    L = inputs["input_ids"].shape[1]
    assert torch.equal(exact.hidden_index[10], torch.arange(L).expand(4, L))  # layer 11 sees every token
    for layer in (11, 15):  # layer 15, the last stage, runs on its kept tokens: compare those
        index = exact.hidden_index[layer - 1]
        want = vanilla.hidden_states[layer - 1].gather(1, index[..., None].expand(-1, -1, 64))
        torch.testing.assert_close(exact.hidden_states[layer - 1], want, atol=1e-5 * want.abs().max().item(), rtol=0)
    index = merged.hidden_index[10]  # input of layer 11: the 7 kept + 3 merged visual tokens
    assert index.shape[1] == L - N_V + 10
    unpruned = vanilla.hidden_states[10].gather(1, index[..., None].expand(-1, -1, 64))
    assert not torch.allclose(merged.hidden_states[10], unpruned, atol=1e-3)


@pytest.mark.parametrize("name", list(DROP_ONLY))
def test_drop_only_equals_masking(model, inputs, name):
    """Property 3: a drop-only schedule gives the logits of the unpruned model with the dropped
    tokens masked out as keys, at every position that reaches the last layer."""
    plan = model.plan_for(DROP_ONLY[name])
    out = model(**inputs, all_logits=True, pruning=plan)
    with torch.no_grad():
        want, masks = masked_forward(model, *inputs.values(), plan)
    got, index, valid = rows_that_reach_the_end(out, inputs)
    torch.testing.assert_close(got, want.gather(1, index[..., None].expand(-1, -1, want.shape[-1]))[valid],
                               atol=1e-5, rtol=0)
    # the tokens that reach the last layer are exactly the keys still unmasked there (and the padding)
    last = masks[-1] | ~inputs["attention_mask"].bool()
    assert torch.equal(last.sum(1), torch.full((4,), index.shape[1]))
    assert last.gather(1, index).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_drop_only_equals_masking_bfloat16(inputs, device):
    """Property 3 in bf16 (FastV: both formulations select with the same layers 1-2). Removing a
    key and masking it round differently; allow twice what bf16 itself loses against fp32."""
    model, exact = tiny_llava(torch.bfloat16, device), tiny_llava(device=device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    plan = model.plan_for(FastV(keep=9))
    out = model(**inputs, all_logits=True, pruning=plan)
    with torch.no_grad():
        want, masks = masked_forward(model, *inputs.values(), plan)
        reference, _ = masked_forward(exact, *inputs.values(), plan, masks)
    got, index, valid = rows_that_reach_the_end(out, inputs)
    pick = index[..., None].expand(-1, -1, want.shape[-1])
    want, reference = want.gather(1, pick)[valid].float(), reference.gather(1, pick)[valid]
    tol = 2 * (want - reference).abs().max().item()
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("name", list(DROP_ONLY))
def test_generation_equals_masking(model, inputs, name):
    """Property 5: decoding from the pruned per-layer KV caches, positions continuing from each
    sample's prompt length, gives the masking formulation's greedy tokens."""
    plan = model.plan_for(DROP_ONLY[name])
    tokens = model.generate(**inputs, pruning=plan, max_new_tokens=5)
    assert torch.equal(tokens, masked_generate(model, inputs, plan, 5))


def forced_scores(plan, kept, n_vis):
    """Per stage, scores over that stage's current visual block that re-select `kept` exactly."""
    scores = []
    for s, ids in enumerate(kept):
        block = torch.arange(n_vis).expand(ids.shape[0], n_vis) if plan.bypass or s == 0 else kept[s - 1]
        scores.append((block[:, :, None] == ids[:, None, :]).any(-1).float())
    return scores


@pytest.mark.parametrize("name", list(PLANS))
def test_generation_continues_the_pruned_prefill(model, inputs, name):
    """Property 5 with real merging: each decoded token equals the prediction of a prefill over
    prompt + the tokens before it, with the same selections. New tokens come after every prompt
    token, so the prompt's states, groups and restored tokens are the same in both."""
    plan = model.plan_for(PLANS[name])
    first = model(**inputs, all_logits=True, pruning=plan)
    tokens = model.generate(**inputs, pruning=plan, max_new_tokens=5)
    assert torch.equal(tokens[:, 0], first.last_logits.argmax(-1))
    longer = {"input_ids": torch.cat([inputs["input_ids"], tokens[:, :-1]], 1), "pixel_values": inputs["pixel_values"],
              "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :-1])], 1)}
    replay = model(**longer, all_logits=True, pruning=plan, stage_scores=forced_scores(plan, first.kept, N_V))
    for a, b in zip(replay.kept, first.kept):
        assert torch.equal(a, b)
    assert torch.equal(replay.logits[:, -5:].argmax(-1), tokens)


@pytest.mark.parametrize("name", list(PLANS))
def test_kept_indices(model, inputs, name):
    plan = model.plan_for(PLANS[name])
    vanilla = model(**inputs, all_logits=True, output_scores=True)
    out = model(**inputs, all_logits=True, pruning=plan)
    assert len(out.kept) == len(plan.stages)
    for s, (stage, kept) in enumerate(zip(plan.stages, out.kept)):
        assert kept.shape == (4, stage.keep) and kept.dtype == torch.int64
        assert (kept.diff(dim=1) > 0).all() and kept.min() >= 0 and kept.max() < N_V
        if not plan.bypass and s > 0:  # drop-only: survivors are re-ranked, never revived
            assert torch.isin(kept, out.kept[s - 1]).all()
    # the first stage scores with layer x_1's own query/keys on its unpruned input
    first, _ = torch.ops.swiftvlm.topk_select(vanilla.layer_scores[plan.stages[0].layer - 1], plan.stages[0].keep)
    assert torch.equal(out.kept[0], first)
    last = plan.stages[-1]
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - N_V + last.keep + last.merge


def test_merged_tokens_take_their_group_targets_positions(model, inputs):
    """After stage 1 the visual block is kept tokens + merged tokens at the positions of the group
    targets t_z = floor(z R / Z) of the rest, in position order."""
    plan = model.plan_for(SwiftVLM(keep=(10, 10, 4), merge=(7, 7)))
    out = model(**inputs, all_logits=True, pruning=plan, output_hidden_states=True)
    vis_start = (inputs["input_ids"] == model.image_token_id).int().argmax(1)
    index = out.hidden_index[3]  # input of layer 4
    assert index.shape[1] == inputs["input_ids"].shape[1] - N_V + 17
    assert (index.diff(dim=1) > 0).all()
    for b in range(4):
        kept = out.kept[0][b].tolist()
        rest = [i for i in range(N_V) if i not in kept]
        targets = [rest[z * len(rest) // 7] for z in range(7)]
        visual = index[b][(index[b] >= vis_start[b]) & (index[b] < vis_start[b] + N_V)] - vis_start[b]
        assert visual.tolist() == sorted(kept + targets)


@pytest.mark.parametrize("name", list(PLANS))
def test_padded_batch_equals_each_sample_alone(model, inputs, name):
    plan = model.plan_for(PLANS[name])
    batch = model(**inputs, all_logits=True, pruning=plan)
    tokens = model.generate(**inputs, pruning=plan, max_new_tokens=4)
    for b, pad in enumerate((inputs["attention_mask"] == 0).sum(1).tolist()):
        alone = {"input_ids": inputs["input_ids"][b:b + 1, pad:], "pixel_values": inputs["pixel_values"][b:b + 1]}
        single = model(**alone, all_logits=True, pruning=plan)
        for a, k in zip(batch.kept, single.kept):
            assert torch.equal(a[b], k[0])
        torch.testing.assert_close(batch.logits[b, pad:], single.logits[0], atol=1e-5, rtol=0)
        assert torch.equal(batch.token_index[b, pad:] - pad, single.token_index[0])
        assert torch.equal(tokens[b:b + 1], model.generate(**alone, pruning=plan, max_new_tokens=4))


@pytest.fixture
def no_tf32():
    """fp32 on CUDA without TF32 (cuDNN convolutions use it by default), restored afterwards."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["vanilla", *PLANS])
def test_cuda_matches_cpu(inputs, name, no_tf32):
    """The same run on CUDA (default backend: the compiled / Triton kernels) and on CPU (the torch
    reference): same selections, close fp32 logits, same tokens."""
    cpu, gpu = tiny_llava(), tiny_llava(device="cuda")
    on_gpu = {k: v.cuda() for k, v in inputs.items()}
    plan = cpu.plan_for(PLANS.get(name))
    want, got = cpu(**inputs, all_logits=True, pruning=plan), gpu(**on_gpu, all_logits=True, pruning=plan)
    for a, b in zip(got.kept, want.kept, strict=True):
        assert torch.equal(a.cpu(), b)
    torch.testing.assert_close(got.logits.cpu(), want.logits, atol=1e-3, rtol=0)
    tokens = gpu.generate(**on_gpu, pruning=plan, max_new_tokens=4).cpu()
    assert torch.equal(tokens, cpu.generate(**inputs, pruning=plan, max_new_tokens=4))


@pytest.mark.cuda
def test_cuda_bfloat16_pruned_runs(inputs):
    """bf16 on CUDA through the kernels: finite logits of the pruned shape and valid selections."""
    model = tiny_llava(torch.bfloat16, "cuda")
    out = model(**{k: v.cuda() for k, v in inputs.items()}, pruning=SwiftVLM())
    assert torch.isfinite(out.logits.float()).all()
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - N_V + 5
    assert all((k.diff(dim=1) > 0).all() for k in out.kept)


@pytest.mark.cuda
@pytest.mark.parametrize("pruning", [SwiftVLM(keep=(N_V,) * 3), FastV(keep=N_V)], ids=["swiftvlm", "fastv"])
def test_cuda_bfloat16_keep_all_equals_vanilla(inputs, pruning):
    """Property 1 in bf16 on CUDA through the kernels: keeping every visual token changes nothing."""
    model = tiny_llava(torch.bfloat16, "cuda")
    on_gpu = {k: v.cuda() for k, v in inputs.items()}
    vanilla, pruned = model(**on_gpu, all_logits=True), model(**on_gpu, all_logits=True, pruning=pruning)
    torch.testing.assert_close(pruned.logits, vanilla.logits, atol=0, rtol=0)
    assert torch.equal(model.generate(**on_gpu, pruning=pruning, max_new_tokens=4),
                       model.generate(**on_gpu, max_new_tokens=4))


# ---- ragged batches: samples with their own number of images (one pool of visual tokens each) ----

RAGGED = {
    "swiftvlm": SwiftVLM(),  # T = n_vis / 3 of each sample's own visual tokens
    "swiftvlm_ratio": SwiftVLM(layers=(4, 9, 16), budget_ratio=0.4),
    "fastv": FastV(budget_ratio=0.3),
    "pdrop": PDrop(layers=(3, 8, 12)),
}


@pytest.mark.parametrize("name", list(RAGGED))
def test_ragged_batch_equals_each_sample_alone(model, name):
    """Samples of 1 to 3 images (36 to 108 visual tokens) in one batch: each sample's plan, kept
    tokens, logits and generated ids are those it gets alone (semantics.md property 6)."""
    batch_inputs, alone = ragged_inputs()
    pruning = RAGGED[name]
    batch = model(**batch_inputs, pruning=pruning)
    tokens = model.generate(**batch_inputs, pruning=pruning, max_new_tokens=4)
    for b, single_inputs in enumerate(alone):
        n_vis = single_inputs["pixel_values"].shape[0] * N_V
        single = model(**single_inputs, pruning=pruning)
        plan = model.plan_for(pruning, n_vis)
        assert [k.shape[1] for k in single.kept] == [st.keep for st in plan.stages]
        for a, k in zip(batch.kept, single.kept):
            kb = a[b][a[b] >= 0]
            assert torch.equal(kb, k[0]), (b, kb, k[0])
            assert (a[b][len(kb):] == -1).all()
        torch.testing.assert_close(batch.last_logits[b], single.last_logits[0], atol=1e-5, rtol=0)
        assert torch.equal(tokens[b:b + 1], model.generate(**single_inputs, pruning=pruning, max_new_tokens=4))


def test_ragged_batch_keep_all_equals_vanilla(model):
    batch_inputs, _ = ragged_inputs()
    vanilla = model(**batch_inputs)
    kept = model(**batch_inputs, pruning=FastV(budget_ratio=1.0))
    torch.testing.assert_close(kept.last_logits, vanilla.last_logits, atol=1e-5, rtol=0)


def test_ragged_plan_errors(model):
    from swiftvlm_kernels.pruning import RaggedPlan
    batch_inputs, _ = ragged_inputs()
    with pytest.raises(ValueError, match="plans: sample 1's plan"):
        RaggedPlan((SwiftVLM().plan(36, 16), FastV().plan(72, 16)))
    with pytest.raises(ValueError, match="pruning: the plan is for n_vis = 36"):
        model(**batch_inputs, pruning=SwiftVLM().plan(36, 16))
    with pytest.raises(ValueError, match="budget, budget_ratio: expected at most one"):
        SwiftVLM(budget=10, budget_ratio=0.3)
    with pytest.raises(ValueError, match="pixel_values: the image tokens of input_ids ask for 7 images"):
        model(**dict(batch_inputs, pixel_values=batch_inputs["pixel_values"][:6]))


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_ragged_batch_on_triton_equals_cpu():
    """The whole ragged pruning path (ragged score_select, compact, group_merge, restore) on the Triton
    kernels keeps the tokens the cpu backend keeps, with the same logits up to fp32 rounding."""
    batch_inputs, _ = ragged_inputs(images=(1, 2), text=(6, 5))
    cpu, triton_model = tiny_llava(), tiny_llava()
    triton_model.backend = "triton"
    for pruning in (SwiftVLM(), PDrop(layers=(3, 8, 12))):
        want, got = cpu(**batch_inputs, pruning=pruning), triton_model(**batch_inputs, pruning=pruning)
        for a, b in zip(want.kept, got.kept):
            assert torch.equal(a, b)
        torch.testing.assert_close(got.last_logits, want.last_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["swiftvlm", "swiftvlm_explicit"])
def test_every_layer_runs_on_its_own_input(model, inputs, name):
    """Each layer's keys are those of the hidden states it receives, merged rows included: at a
    stage >= 2 the layer reuses the scoring pass's normed input and keys, which were computed before
    the merge, so a merged token's row must get its own (the group mean's), not its target's."""
    ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    plan = model.plan_for(PLANS[name])
    hidden = []
    with torch.no_grad():
        _, caches = model.prefill(ids, pixels, mask.bool(), plan, caching=True, hidden=hidden)
        for layer, (h, index), cache in zip(model.language_model.layers, hidden, caches):
            positions = (mask.long().cumsum(1) - 1).clamp_min(0).gather(1, index)
            cos, sin = model.rope_table(positions, h.dtype).unbind(2)
            want = layer.self_attn.keys(layer.input_layernorm(h), cos, sin)
            assert cache.k.shape[1] == want.shape[1]
            torch.testing.assert_close(cache.k, want, rtol=0, atol=1e-6)
