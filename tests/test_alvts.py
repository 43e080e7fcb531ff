"""ALVTS (docs/semantics.md "ALVTS") on the tiny models: keep-all is the unpruned model, the default selector
is the layer's own query-key form, skipped tokens pass their layer unchanged, ragged samples give what they
give alone, decoding from the per-layer caches equals a reference that masks the skipped tokens layer by
layer, transformers' four families, and the selector's files."""
import json
import re

import pytest
import torch

import python_ref
from swiftvlm_kernels.models.llava import KVCache
from swiftvlm_kernels.models.tiny import save_tiny_llava, tiny_inputs, tiny_llava, tiny_llava_config
from swiftvlm_kernels.pruning import ALVTS, PruningEngine, Selector, Sequence
from swiftvlm_kernels.pruning.selector import RECORD, TENSORS, selector_inputs
from test_llava_pruning import inputs, model, ragged_inputs  # noqa: F401  (the tiny LLaVA, 4 left-padded samples)

N_V = 36  # the tiny LLaVA's visual tokens; 16 layers, hidden size 64, 4 query heads on 2 KV heads of 16


# -- 1. keep-all is the unpruned forward --------------------------------------------------------------

@pytest.mark.parametrize("pruning", [ALVTS(keep=N_V), ALVTS(budget_ratio=1.0), ALVTS(layers=(1, 4, 16), keep=N_V)],
                         ids=["keep", "ratio", "layers"])
def test_keep_all_equals_vanilla_exactly(model, inputs, pruning):
    vanilla = model(**inputs, all_logits=True)
    out = model(**inputs, all_logits=True, pruning=pruning)
    assert torch.equal(out.logits, vanilla.logits) and torch.equal(out.token_index, vanilla.token_index)
    assert all(torch.equal(k, torch.arange(N_V).expand(4, N_V)) for k in out.kept)
    assert torch.equal(model.generate(**inputs, pruning=pruning, max_new_tokens=4),
                       model.generate(**inputs, max_new_tokens=4))


def test_ragged_keep_all_equals_vanilla(model):
    batch, _ = ragged_inputs()
    vanilla, out = model(**batch), model(**batch, pruning=ALVTS(budget_ratio=1.0))
    assert torch.equal(out.last_logits, vanilla.last_logits)


# -- 2. the default selector is the layer's own query-key form ---------------------------------------

def _heads(x, proj, D):
    return proj(x).unflatten(-1, (-1, D)).transpose(1, 2)  # [B, heads, n, D]


def test_full_rank_selector_is_the_layers_form(model, inputs):
    """At full rank (R = d = H D = 64) the SVD selector's logits are sum_h <q_h, k_g(h)> of the layer's
    own projections without RoPE: the importance of attention_importance on the heads side by side
    (one head of width H D, scale R ** -0.5) within fp32 rounding; and the model keeps at layer 2 the
    top-k of that importance on layer 2's input (layer 1 ran on every token)."""
    vanilla = model(**inputs, output_hidden_states=True)
    layers = model.language_model.layers
    selector = Selector.from_layers(layers, [2, 7], rank=64)
    assert selector.rank == 64 and selector.layers == (2, 7)
    vis_start = (inputs["input_ids"] == model.image_token_id).int().argmax(1)
    valid = inputs["attention_mask"].bool()
    for layer_no in (2, 7):
        layer = layers[layer_no - 1]
        x = layer.input_layernorm(vanilla.hidden_states[layer_no - 1])
        q, k = _heads(x, layer.self_attn.q_proj, 16), _heads(x, layer.self_attn.k_proj, 16)
        q_side, k_side = q.transpose(1, 2).flatten(2)[:, None], k.repeat_interleave(2, 1).transpose(1, 2).flatten(2)[:, None]
        want = python_ref.attention_importance(q_side, k_side, vis_start, N_V, 64 ** -0.5, valid)
        got = python_ref.attention_importance(*selector_inputs(selector, layer_no, x), vis_start, N_V, 64 ** -0.5, valid)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    default = model(**inputs, pruning=ALVTS(budget_ratio=0.3))  # default rank 128 -> min(128, d) = 64
    x = layers[1].input_layernorm(vanilla.hidden_states[1])
    t2v, v2v = torch.ops.swiftvlm.attention_importance(*selector_inputs(selector, 2, x), vis_start, N_V, 0.125, valid)
    keep, _ = torch.ops.swiftvlm.topk_select(t2v * v2v, default.kept[0].shape[1])
    assert torch.equal(default.kept[0], keep)


def test_one_head_selector_gives_the_layers_own_importance():
    """A model of one query and one KV head (D = 16 < d = 64): M has rank 16, and the rank-16 selector
    gives the layer's own attention importance without RoPE at the layer's scale D ** -0.5."""
    config = tiny_llava_config()
    config["text_config"].update(num_attention_heads=1, num_key_value_heads=1)
    one = tiny_llava(config=config)
    inputs = tiny_inputs(2, left_pad=2, config=config)
    h = one(**inputs, output_hidden_states=True).hidden_states[4]
    layer = one.language_model.layers[4]
    selector = Selector.from_layers(one.language_model.layers, [5], rank=16)
    x = layer.input_layernorm(h)
    vis_start = (inputs["input_ids"] == one.image_token_id).int().argmax(1)
    valid = inputs["attention_mask"].bool()
    want = python_ref.attention_importance(_heads(x, layer.self_attn.q_proj, 16), _heads(x, layer.self_attn.k_proj, 16),
                                           vis_start, N_V, 16 ** -0.5, valid)
    got = python_ref.attention_importance(*selector_inputs(selector, 5, x), vis_start, N_V, selector.scale, valid)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# -- 3. a skipped token's state passes its layer bit for bit ------------------------------------------

def test_engine_stage_skips_and_restores_bit_for_bit():
    """The engine alone: a layer-only stage keeps k rows for the layer; restore after a 'layer' puts the
    skipped rows back bit for bit (-0.0 included) and the kept rows as the layer left them."""
    g = torch.Generator().manual_seed(0)
    B, L, d, n_vis, R = 3, 14, 6, 8, 4
    h = torch.randn(B, L, d, generator=g)
    h[:, ::2, 0] = -0.0
    vis_start = torch.tensor([1, 3, 5])
    plan = ALVTS(layers=(2,), keep=3).plan(n_vis, 4)
    engine = PruningEngine(plan, scale=0.3)
    q, k = torch.randn(B, 1, L, R, generator=g), torch.randn(B, 1, L, R, generator=g)
    seq = engine.select(Sequence.begin(h, vis_start, n_vis, carry={"pos": torch.arange(L).expand(B, L)}), 0, q, k)
    t2v, v2v = python_ref.attention_importance(q, k, vis_start, n_vis, R ** -0.5)
    keep, rest = python_ref.topk_select(t2v * v2v, 3)
    assert torch.equal(seq.kept[0], keep) and seq.h.shape == (B, L - n_vis + 3, d)
    assert torch.equal(seq.carry["pos"], seq.index)
    seq.h = seq.h * 2 - 1  # the layer, on the kept rows
    back = engine.restore(seq)
    assert back.h.shape == (B, L, d) and torch.equal(back.carry["pos"], torch.arange(L).expand(B, L))
    skipped = vis_start[:, None] + rest
    for b in range(B):
        for r in range(L):
            if r in skipped[b]:
                assert torch.equal(back.h[b, r].view(torch.int32), h[b, r].view(torch.int32))
            else:
                assert torch.equal(back.h[b, r], h[b, r] * 2 - 1)


def test_skipped_tokens_pass_their_layer_unchanged(model, inputs, monkeypatch):
    """In the model, at every selecting layer: the state each skipped token has when it rejoins is the
    state it had entering the layer, bit for bit; one selecting layer alone (layer 3): the full
    sequence entering layer 4 holds, at the skipped rows, the unpruned input of layer 3."""
    entering, rejoined = [], []
    select, restore = PruningEngine.select, PruningEngine.restore

    def select_spy(self, seq, s, *args, **kwargs):
        entering.append(seq.h)
        return select(self, seq, s, *args, **kwargs)

    def restore_spy(self, seq):
        out = restore(self, seq)
        if seq._bypass is not None:  # (before a stage, the loop's restore has nothing to restore)
            rejoined.append((out.h, seq._bypass.rest_idx))
        return out

    monkeypatch.setattr(PruningEngine, "select", select_spy)
    monkeypatch.setattr(PruningEngine, "restore", restore_spy)
    model(**inputs, pruning=ALVTS(budget_ratio=0.2))
    assert len(entering) == len(rejoined) == 15
    vis_start = (inputs["input_ids"] == model.image_token_id).int().argmax(1)
    for before, (after, rest) in zip(entering, rejoined):
        rows = (vis_start[:, None] + rest)[..., None].expand(-1, -1, 64)
        assert torch.equal(after.gather(1, rows).view(torch.int32), before.gather(1, rows).view(torch.int32))
        assert not torch.equal(after, before)
    monkeypatch.undo()
    vanilla = model(**inputs, output_hidden_states=True)
    one = model(**inputs, pruning=ALVTS(layers=(3,), keep=10), output_hidden_states=True)
    kept = one.kept[0]
    skipped = torch.stack([torch.tensor([i for i in range(N_V) if i not in kept[b]]) for b in range(4)])
    rows = (vis_start[:, None] + skipped)[..., None].expand(-1, -1, 64)
    assert torch.equal(one.hidden_index[3], vanilla.hidden_index[3])  # layer 4 sees every token
    assert torch.equal(one.hidden_states[3].gather(1, rows), vanilla.hidden_states[2].gather(1, rows))
    assert one.hidden_states[2].shape[1] == inputs["input_ids"].shape[1] - N_V + 10  # layer 3: its kept set


# -- 4. ragged batches: each sample gives what it gives alone -----------------------------------------

@pytest.mark.parametrize("pruning", [ALVTS(budget_ratio=0.3), ALVTS(layers=(2, 5, 9, 16), budget_ratio=0.8)],
                         ids=["every-layer", "some-layers"])
def test_ragged_batch_equals_each_sample_alone(model, pruning):
    batch_inputs, alone = ragged_inputs()
    batch = model(**batch_inputs, pruning=pruning)
    tokens = model.generate(**batch_inputs, pruning=pruning, max_new_tokens=4)
    for b, single_inputs in enumerate(alone):
        single = model(**single_inputs, pruning=pruning)
        plan = model.plan_for(pruning, single_inputs["pixel_values"].shape[0] * N_V)
        assert [k.shape[1] for k in single.kept] == [st.keep for st in plan.stages]
        for a, k in zip(batch.kept, single.kept):
            kb = a[b][a[b] >= 0]
            assert torch.equal(kb, k[0]) and (a[b][len(kb):] == -1).all()
        torch.testing.assert_close(batch.last_logits[b], single.last_logits[0], atol=1e-5, rtol=0)
        assert torch.equal(tokens[b:b + 1], model.generate(**single_inputs, pruning=pruning, max_new_tokens=4))


def test_ragged_prefill_issues_no_host_sync(model):
    from bench.host import OpCounter

    batch_inputs, _ = ragged_inputs()
    checked = model.check_inputs(batch_inputs["input_ids"], batch_inputs["pixel_values"],
                                 batch_inputs["attention_mask"], True)
    pruning = ALVTS(budget_ratio=0.3)
    plan = model.plan_for(pruning, checked.counts)
    selector = model.selector_for(pruning, plan)
    with OpCounter() as counter:
        model.prefill(*checked[:3], plan, layout=checked.layout, selector=selector)
    assert counter.syncs == 0, counter.by_name


# -- 5. decoding from the per-layer caches equals masking the skipped tokens layer by layer -----------

def masked_reference(model, inputs, plan, selector, n_new):
    """ALVTS written as masking, on the full sequence: at a selecting layer l the selector picks k_l
    visual tokens from all of them (on layer l's normed input); the tokens it skips are neither keys nor
    queries at layer l (masked as keys; their states pass unchanged, the layer's output at their rows
    discarded). Layer l's cache holds every row, the skipped ones masked, for the new tokens. Greedy
    decoding then runs every layer on its cache. Returns (the prompt's last logits, kept per stage, ids)."""
    ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    B, L = ids.shape
    valid = mask.bool()
    vis_start = (ids == model.image_token_id).int().argmax(1)
    rows = vis_start[:, None] + torch.arange(N_V)
    visual = torch.zeros(B, L, dtype=torch.bool).scatter_(1, rows, True)
    h = model.embed(ids, pixels, vis_start)
    cos, sin = model.rope_table((mask.cumsum(1) - 1).clamp_min(0), h.dtype).unbind(2)
    causal, itself = torch.ones(L, L, dtype=torch.bool).tril(), torch.eye(L, dtype=torch.bool)
    caches, kept = [], []
    for i, layer in enumerate(model.language_model.layers, start=1):
        active = torch.ones(B, L, dtype=torch.bool)
        s = plan.stage_before(i)
        if s is not None:
            wq, wk = selector.weights[i]
            x = layer.input_layernorm(h)
            t2v, v2v = python_ref.attention_importance((x @ wq)[:, None], (x @ wk)[:, None], vis_start, N_V,
                                                       selector.rank ** -0.5, valid)
            keep, _ = python_ref.topk_select(t2v * v2v, plan.stages[s].keep)
            kept.append(keep)
            active = ~visual
            active.scatter_(1, rows.gather(1, keep), True)
        keys = valid & active
        out, _, k, v = layer(h, cos, sin, ((causal & keys[:, None, :]) | itself)[:, None])
        h = torch.where(active[..., None], out, h)
        caches.append(KVCache(k, v, keys))
    lm = model.language_model
    logits = model.lm_head(lm.norm(h[:, -1]))
    tokens = [logits.argmax(-1)]
    for t in range(n_new - 1):
        cos_t, sin_t = model.rope_table((valid.sum(1) + t)[:, None], h.dtype).unbind(2)
        e = lm.embed_tokens(tokens[-1])[:, None]
        for layer, cache in zip(lm.layers, caches):
            e = layer(e, cos_t, sin_t, None, cache)[0]
        tokens.append(model.lm_head(lm.norm(e[:, -1])).argmax(-1))
    return logits, kept, torch.stack(tokens, 1)


@pytest.mark.parametrize("pruning", [ALVTS(budget_ratio=1 / 9), ALVTS(layers=(2, 3, 8, 15), keep=(5, 20, 0, 9))],
                         ids=["default", "explicit"])
def test_generation_equals_masking_the_skipped_tokens(model, inputs, pruning):
    plan = model.plan_for(pruning)
    selector = model.selector_for(pruning, plan)
    with torch.no_grad():
        logits, kept, want = masked_reference(model, inputs, plan, selector, 5)
    out = model(**inputs, pruning=pruning)
    assert len(out.kept) == len(kept) == len(plan.stages)
    for a, b in zip(out.kept, kept):
        assert torch.equal(a, b)
    torch.testing.assert_close(out.last_logits, logits, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(**inputs, pruning=pruning, max_new_tokens=5), want)


def test_each_layers_cache_holds_exactly_its_rows(model, inputs):
    """Decoding reads, at layer l, the rows layer l ran on: text and its kept visual tokens."""
    pruning = ALVTS(layers=(2, 6), keep=(4, 11))
    plan = model.plan_for(pruning)
    checked = model.check_inputs(*inputs.values(), True)
    seq, caches = model.prefill(*checked[:3], plan, caching=True)
    L = inputs["input_ids"].shape[1]
    assert [c.size for c in caches] == [L, L - N_V + 4, L, L, L, L - N_V + 11] + [L] * 10
    assert seq.h.shape[1] == L


# -- 6. transformers: the four families ---------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from swiftvlm_kernels import hf  # noqa: E402
from test_hf import BACKEND, GREEDY, next_inputs, qwen_inputs, tiny_llava_next, tiny_qwen2_5_vl, tiny_qwen2_vl  # noqa: E402


def _greedy(model, inputs, n=4):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **GREEDY)[:, -n:]


def _family_check(model, inputs, alone, n_vis_per_sample, positions=False):
    """keep-all: HF's logits and greedy ids exactly; ALVTS(budget_ratio=1/9): generates from the pruned
    caches (layer 1 and each selecting layer's own lengths) and each sample gives what it gives alone
    (positions: pass LLaVA's left-padded positions, cumsum(mask) - 1, as generate does; batch and
    sample alone round differently, within 2e-5 at these 16 layers)."""
    ragged = len(set(n_vis_per_sample)) > 1
    exact = alone if ragged else [inputs] + alone  # a ragged batch runs in its padded layout: its samples
    with torch.no_grad():
        for x in exact:
            hf.apply(model, None)
            ref, ref_ids = model(**x).logits, _greedy(model, x)
            hf.apply(model, ALVTS(budget_ratio=1.0), backend=BACKEND)
            assert torch.equal(model(**x).logits, ref)
            assert torch.equal(_greedy(model, x), ref_ids)
        pruning = ALVTS(budget_ratio=1 / 9)
        hf.apply(model, pruning, backend=BACKEND)
        pos = {"position_ids": (inputs["attention_mask"].cumsum(1) - 1).clamp_min(0)} if positions else {}
        logits = model(**inputs, **pos).logits[:, -1]
        record = hf.last_prefill(model)
        num_layers = len(model.model.language_model.layers)
        assert len(record.kept) == num_layers - 1
        lengths, keep = record.layer_lengths, record.plan.stages[0].keep  # (a ragged batch: the widest keep)
        assert 0 < keep < max(n_vis_per_sample)
        assert lengths[1:] == [lengths[0] - max(n_vis_per_sample) + keep] * (num_layers - 1)
        ids = _greedy(model, inputs)
        assert ids.shape == (inputs["input_ids"].shape[0], 4)
        for b, one in enumerate(alone):
            torch.testing.assert_close(logits[b:b + 1], model(**one).logits[:, -1], atol=2e-5, rtol=0)
            mine = hf.last_prefill(model).kept
            for s, k in enumerate(mine):
                assert torch.equal(record.kept[s][b, :k.shape[1]], k[0])
            assert torch.equal(ids[b:b + 1], _greedy(model, one))
        hf.apply(model, None)


def _alone(inputs, b, pixel_values, **extra):
    keep = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
           "pixel_values": pixel_values}
    out.update({k: v[b:b + 1, keep] if v.dim() == 2 and v.shape[1] == keep.shape[0] else v[b:b + 1]
                for k, v in extra.items()})
    return out


def test_hf_llava(tmp_path):
    path = save_tiny_llava(tmp_path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                       attn_implementation="sdpa").eval()
    inputs = tiny_inputs(3, left_pad=3)
    alone = [_alone(inputs, b, inputs["pixel_values"][b:b + 1]) for b in range(3)]
    _family_check(model, inputs, alone, [N_V] * 3, positions=True)
    assert hf.default_layers(16, "alvts") == tuple(range(2, 17))
    method = hf.default_method(model, "alvts", budget_ratio=0.5)
    assert isinstance(method, ALVTS) and method.layers == tuple(range(2, 17))


def test_hf_llava_matches_the_minimal_forward(tmp_path):
    from swiftvlm_kernels.models.llava import LlavaForward

    path = save_tiny_llava(tmp_path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                       attn_implementation="sdpa").eval()
    ours = LlavaForward.from_pretrained(path)
    ours.backend = BACKEND
    inputs = tiny_inputs(3, left_pad=3)
    pruning = ALVTS(budget_ratio=0.2)
    with torch.no_grad():
        hf.apply(model, pruning, backend=BACKEND)
        pos = (inputs["attention_mask"].cumsum(1) - 1).clamp_min(0)
        logits = model(**inputs, position_ids=pos).logits[:, -1]
        want = ours(**inputs, pruning=pruning)
        for a, b in zip(hf.last_prefill(model).kept, want.kept, strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(logits, want.last_logits, atol=1e-5, rtol=0)
        assert torch.equal(_greedy(model, inputs, 5), ours.generate(**inputs, pruning=pruning, max_new_tokens=5))


def test_hf_llava_next_ragged():
    model = tiny_llava_next(num_layers=16)
    inputs, counts = next_inputs(model, [[28, 56], [56, 40]])
    assert counts[0] != counts[1]
    alone = [_alone(inputs, b, inputs["pixel_values"][b:b + 1], image_sizes=inputs["image_sizes"]) for b in range(2)]
    _family_check(model, inputs, alone, counts, positions=True)


@pytest.mark.parametrize("make", [tiny_qwen2_vl, tiny_qwen2_5_vl], ids=["qwen2_vl", "qwen2_5_vl"])
def test_hf_qwen_ragged(make):
    model = make(num_layers=16)
    grids = [[1, 12, 12], [1, 8, 12]]  # 36 and 24 visual tokens
    inputs = qwen_inputs(grids)
    alone, first = [], 0
    for b, (t, h, w) in enumerate(grids):
        alone.append(_alone(inputs, b, inputs["pixel_values"][first:first + t * h * w],
                            image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=inputs["mm_token_type_ids"]))
        first += t * h * w
    _family_check(model, inputs, alone, [36, 24])


# -- 7. selector files ------------------------------------------------------------------------------

def test_selector_save_load_round_trip(model, inputs, tmp_path):
    selector = Selector.from_layers(model.language_model.layers, (2, 3, 9), rank=8)
    path = selector.save(tmp_path / "sel")
    record = json.loads((path / RECORD).read_text())
    assert record == {"format": "swiftvlm-alvts-selector", "version": 1, "rank": 8, "hidden_size": 64,
                      "layers": [2, 3, 9], "init": "svd", "calibration": None}
    loaded = Selector.load(path)
    assert loaded.layers == (2, 3, 9) and loaded.rank == 8 and loaded.record == {"init": "svd", "calibration": None}
    for layer in (2, 3, 9):
        assert all(torch.equal(a, b) for a, b in zip(loaded.weights[layer], selector.weights[layer]))
    pruning = dict(layers=(2, 3, 9), keep=(5, 7, 9))
    a, b = model(**inputs, pruning=ALVTS(selector=selector, **pruning)), model(**inputs, pruning=ALVTS(selector=loaded,
                                                                                                       **pruning))
    assert torch.equal(a.last_logits, b.last_logits)
    assert not torch.equal(a.last_logits, model(**inputs, pruning=ALVTS(**pruning)).last_logits)  # rank 64 differs
    with pytest.raises(ValueError, match=r"pruning: ALVTS\(selector=...\): no weights for the selecting layers \[4\]"):
        model(**inputs, pruning=ALVTS(selector=loaded, layers=(2, 4), keep=3))


def _corrupt(tmp_path, model, edit_record=None, tensors=None, raw=None):
    path = Selector.from_layers(model.language_model.layers, (2, 3), rank=4).save(tmp_path / "bad")
    if edit_record is not None:
        record = json.loads((path / RECORD).read_text())
        edit_record(record)
        (path / RECORD).write_text(json.dumps(record))
    if tensors is not None:
        from safetensors.torch import save_file

        save_file(tensors, str(path / TENSORS))
    if raw is not None:
        name, data = raw
        (path / name).write_bytes(data)
    return path


def _good_tensors(layers=(2, 3), d=64, R=4):
    return {f"layers.{l}.{n}": torch.zeros(d, R) for l in layers for n in ("wq", "wk")}


MALFORMED = {
    "not-json": (dict(raw=(RECORD, b"{not json")), RECORD, "not a JSON selector record"),
    "not-utf8": (dict(raw=(RECORD, b"\xff\xfe")), RECORD, "not a JSON selector record"),
    "list": (dict(raw=(RECORD, b"[1, 2]")), RECORD, "expected a JSON object"),
    "format": (dict(edit_record=lambda r: r.update(format="pickle")), RECORD, "expected format"),
    "version": (dict(edit_record=lambda r: r.update(version=2)), RECORD, "expected format"),
    "unknown-entry": (dict(edit_record=lambda r: r.update(code="import os")), RECORD, "unexpected entries"),
    "rank": (dict(edit_record=lambda r: r.update(rank=65)), RECORD, "rank: expected an int in"),
    "rank-bool": (dict(edit_record=lambda r: r.update(rank=True)), RECORD, "rank: expected an int in"),
    "layers": (dict(edit_record=lambda r: r.update(layers=[3, 2])), RECORD, "layers: expected"),
    "layers-empty": (dict(edit_record=lambda r: r.update(layers=[])), RECORD, "layers: expected"),
    "init": (dict(edit_record=lambda r: r.update(init=3)), RECORD, "init: expected"),
    "missing-tensor": (dict(tensors={k: v for k, v in _good_tensors().items() if k != "layers.3.wk"}), TENSORS,
                       r"missing \['layers.3.wk'\]"),
    "extra-tensor": (dict(tensors=dict(_good_tensors(), extra=torch.zeros(1))), TENSORS, r"unexpected \['extra'\]"),
    "shape": (dict(tensors=dict(_good_tensors(), **{"layers.2.wq": torch.zeros(64, 5)})), TENSORS,
              "tensor layers.2.wq: expected F32 of shape"),
    "dtype": (dict(tensors=dict(_good_tensors(), **{"layers.2.wk": torch.zeros(64, 4, dtype=torch.float16)})),
              TENSORS, "tensor layers.2.wk: expected F32"),
    "nan": (dict(tensors=dict(_good_tensors(), **{"layers.3.wq": torch.full((64, 4), float("nan"))})), TENSORS,
            "layer 3: expected finite weights"),
    "garbage": (dict(raw=(TENSORS, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")), TENSORS,
                "not a readable safetensors file"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_selector_files_are_refused_naming_the_file(model, tmp_path, name):
    corruption, file, message = MALFORMED[name]
    path = _corrupt(tmp_path, model, **corruption)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path / file))}: .*{message}"):
        Selector.load(path)


def test_selector_and_method_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=RECORD):
        Selector.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="rank, selector: expected at most one"):
        ALVTS(rank=4, selector=Selector.from_layers(model.language_model.layers, (2,), rank=4))
    with pytest.raises(ValueError, match="selector: expected a swiftvlm_kernels.pruning.selector.Selector"):
        ALVTS(selector="path/to/selector")
    with pytest.raises(ValueError, match="weights: expected 1-indexed int layers, got '2'"):
        Selector({2: (torch.zeros(4, 2),) * 2, "2": (torch.zeros(4, 2),) * 2})
    with pytest.raises(ValueError, match="weights: expected a rank R in"):
        Selector({2: (torch.zeros(4, 8), torch.zeros(4, 8))})
    with pytest.raises(ValueError, match=r"weights\[3\] Wk: expected a float tensor \[d, R\] of shape \[4, 2\]"):
        Selector({2: (torch.zeros(4, 2), torch.zeros(4, 2)), 3: (torch.zeros(4, 2), torch.zeros(4, 3))})
    with pytest.raises(ValueError, match="hidden size 4, the model's is 64"):
        model(**tiny_inputs(1), pruning=ALVTS(layers=(2,), keep=3, selector=Selector({2: (torch.zeros(4, 2),) * 2})))
