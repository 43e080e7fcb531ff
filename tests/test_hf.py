"""swiftvlm_kernels.hf: pruning inside transformers' own LLaVA and Qwen2-VL models (tiny random
configs built here, fp32 on CPU, no downloads; the `cpu` backend of the ops)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from swiftvlm_kernels import hf  # noqa: E402
from swiftvlm_kernels.models.llava import LlavaForward  # noqa: E402
from swiftvlm_kernels.models.tiny import save_tiny_llava, tiny_inputs, tiny_llava_config  # noqa: E402
from swiftvlm_kernels.hf.compat import cache_parameter, output_cache  # noqa: E402
from swiftvlm_kernels.pruning import FastV, PDrop, SwiftVLM  # noqa: E402

BACKEND = "cpu"
IMG = 511  # the tiny LLaVA's image token; 36 visual tokens per image, 16 layers
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def hf_llava(path, attn="sdpa"):
    return transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                      attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def llava(llava_dir):
    model = hf_llava(llava_dir)
    yield model
    hf.apply(model, None)


@pytest.fixture(scope="module")
def ours(llava_dir):
    model = LlavaForward.from_pretrained(llava_dir)
    model.backend = BACKEND
    return model


def cumsum_positions(mask):
    return (mask.long().cumsum(1) - 1).clamp_min(0)


def keep_all(layers=(3, 11, 15), n=36):
    return SwiftVLM(layers=layers, keep=(n,) * len(layers), merge=(0,) * (len(layers) - 1))


# -- keep-all: HF's own logits and generate ids, exactly -------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llava_keep_all_is_hf_exactly(llava_dir, attn):
    model = hf_llava(llava_dir, attn)
    inputs = tiny_inputs(3, left_pad=3)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, **GREEDY)
        assert hf.apply(model, keep_all(), backend=BACKEND) is model and hf.is_applied(model)
        assert torch.equal(model(**inputs).logits, ref)
        assert hf.last_prefill(model) is not None and hf.last_prefill(model).layer_lengths == [48] * 16
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, **GREEDY), ref_ids)
        hf.apply(model, None)
        assert not hf.is_applied(model) and "forward" not in model.model.language_model.__dict__
        assert torch.equal(model(**inputs).logits, ref)


def test_llava_sampling_and_eos_keep_all_is_hf(llava):
    """Sampling (same seed), EOS stopping with padding after it, and beam search: HF's own ids."""
    inputs = tiny_inputs(2, left_pad=2)
    with torch.no_grad():
        hf.apply(llava, None)
        first = llava.generate(**inputs, max_new_tokens=1, **GREEDY)[:, -1]
        kw = dict(max_new_tokens=6, do_sample=True, top_k=20, eos_token_id=int(first[0]), pad_token_id=0)
        torch.manual_seed(3)
        ref = llava.generate(**inputs, **kw)
        hf.apply(llava, keep_all(), backend=BACKEND)
        torch.manual_seed(3)
        got = llava.generate(**inputs, **kw)
        assert torch.equal(got, ref)
        beams = dict(max_new_tokens=4, num_beams=3, **GREEDY)  # the cache is reordered between beams
        hf.apply(llava, None)
        ref_beams = llava.generate(**inputs, **beams)
        hf.apply(llava, keep_all(), backend=BACKEND)
        assert torch.equal(llava.generate(**inputs, **beams), ref_beams)
        hf.apply(llava, SwiftVLM(layers=(3, 11, 15), budget_ratio=0.4), backend=BACKEND)
        torch.manual_seed(3)
        pruned = llava.generate(**inputs, **kw)  # runs; stops at EOS and pads after it
        assert pruned.shape[0] == 2 and pruned.shape[1] <= inputs["input_ids"].shape[1] + 6
        L = inputs["input_ids"].shape[1]
        for row in pruned[:, L:]:
            hit = (row == kw["eos_token_id"]).nonzero()
            if len(hit):
                assert (row[int(hit[0]) + 1:] == 0).all()


# -- the HF path and the minimal forward: same tokens, same logits, same greedy ids -----------------

@pytest.mark.parametrize("pruning", [FastV(layer=2, budget_ratio=0.4), PDrop(layers=(2, 6, 10), budget_ratio=0.5),
                                     SwiftVLM(layers=(3, 11), budget_ratio=0.4),
                                     SwiftVLM(layers=(3, 11, 15), budget_ratio=0.4)],  # a merging stage s >= 2
                         ids=["fastv", "pdrop", "swiftvlm", "swiftvlm-3-stages"])
def test_llava_matches_minimal_forward(llava, ours, pruning):
    _matches_minimal_forward(llava, ours, pruning)


def test_llava_eager_matches_minimal_forward(llava_dir, ours):
    """The same through HF's eager attention (its additive float masks on the pruned sequences). Eager
    attention rounds differently from the minimal forward's SDPA: the tolerance is test_llava.py's
    for HF against the minimal forward (1e-4); the kept tokens and greedy ids are still exact."""
    model = hf_llava(llava_dir, "eager")
    _matches_minimal_forward(model, ours, SwiftVLM(layers=(3, 11), budget_ratio=0.4), atol=1e-4)


def _matches_minimal_forward(llava, ours, pruning, atol=1e-5):
    inputs = tiny_inputs(3, left_pad=3)
    with torch.no_grad():
        hf.apply(llava, pruning, backend=BACKEND)
        logits = llava(**inputs, position_ids=cumsum_positions(inputs["attention_mask"])).logits[:, -1]
        record = hf.last_prefill(llava)
        want = ours(**inputs, pruning=pruning)
        assert len(record.kept) == len(want.kept)
        for a, b in zip(record.kept, want.kept):
            assert torch.equal(a, b)
        torch.testing.assert_close(logits, want.last_logits, atol=atol, rtol=0)
        ids = llava.generate(**inputs, max_new_tokens=5, min_new_tokens=5, **GREEDY)[:, -5:]
        assert torch.equal(ids, ours.generate(**inputs, pruning=pruning, max_new_tokens=5))


# -- the KV cache under either argument name (transformers renamed past_key_values to cache) --------

def _layer_class_taking(base: type, name: str) -> type:
    """A subclass of a decoder layer class whose forward declares the cache under `name` only, and
    fails unless it receives it there (so a caller passing the other name is caught)."""
    inner = cache_parameter(base)
    other = next(n for n in ("cache", "past_key_values") if n != name)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, _cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        assert other not in kwargs, f"the layer declares {name!r} and was given {other!r}"
        return base.forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=use_cache, position_embeddings=position_embeddings, **{inner: _cache}, **kwargs)

    code = forward.__code__
    names = tuple(name if v == "_cache" else v for v in code.co_varnames)
    forward.__code__ = code.replace(co_varnames=names)
    return type(f"{base.__name__}_{name}", (base,), {"forward": forward})


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_tap_follows_the_layers_cache_argument(llava_dir, name):
    """Decoder layers that take the KV cache as `cache` or as `past_key_values` (whichever the
    transformers release declares): the pruned prefill taps the keys and decodes from the pruned
    caches the same way, and the text model takes the cache under either name."""
    model = hf_llava(llava_dir)
    inputs = tiny_inputs(2, left_pad=2)
    pruning = SwiftVLM(layers=(3, 11, 15), budget_ratio=0.4)
    with torch.no_grad():
        hf.apply(model, pruning, backend=BACKEND)
        want_logits = model(**inputs).logits
        want_ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **GREEDY)
        layers = model.model.language_model.layers
        renamed = _layer_class_taking(type(layers[0]), name)
        for layer in layers:
            layer.__class__ = renamed
        assert cache_parameter(layers[0]) == name
        torch.testing.assert_close(model(**inputs).logits, want_logits, atol=0, rtol=0)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **GREEDY), want_ids)
        for layer in layers:  # transformers' own text forward (a call without image tokens) calls them too
            layer.__class__ = renamed.__base__
        text = model.model.language_model
        embeds = text.embed_tokens(inputs["input_ids"].clamp_max(100))
        for key in ("cache", "past_key_values"):  # the text model's own forward: either name, not both
            cache = transformers.DynamicCache(config=text.config)
            text(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **{key: cache})
            assert cache.get_seq_length() == embeds.shape[1]
        with pytest.raises(ValueError, match="cache, past_key_values"):
            text(inputs_embeds=embeds, cache=transformers.DynamicCache(config=text.config),
                 past_key_values=transformers.DynamicCache(config=text.config))


# -- semantics.md property 3: drop-only equals masking the dropped keys through HF's layers -----------------

def _embeds(model, inputs):
    got = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: got.update(h=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return got["h"]


def test_drop_only_equals_masking(llava):
    pruning = PDrop(layers=(2, 6, 10), budget_ratio=0.5)
    inputs = tiny_inputs(2)
    ids = inputs["input_ids"]
    with torch.no_grad():
        hf.apply(llava, pruning, backend=BACKEND)
        got = llava(**inputs).logits[:, -1]
        plan, kept = hf.last_prefill(llava).plan, hf.last_prefill(llava).kept
        hf.apply(llava, None)
        h = _embeds(llava, inputs)
        text = llava.model.language_model
        B, L = ids.shape
        cos, sin = text.rotary_emb(h, torch.arange(L)[None])
        start = (ids == IMG).int().argmax(1)
        valid = torch.ones(B, L, dtype=torch.bool)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        for i, layer in enumerate(text.layers, start=1):
            h = layer(h, attention_mask=(causal & valid[:, None, :])[:, None], position_embeddings=(cos, sin))
            s = plan.stage_after(i)
            if s is not None:  # from layer i + 1 on, only kept visual tokens are keys
                visual = torch.zeros(B, L, dtype=torch.bool)
                visual[torch.arange(B)[:, None], start[:, None] + torch.arange(36)] = True
                keep = torch.zeros(B, L, dtype=torch.bool)
                keep[torch.arange(B)[:, None], start[:, None] + kept[s]] = True
                valid = ~visual | keep
        want = llava.lm_head(text.norm(h))[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -- batches: left-padded and ragged batches equal their samples alone -----------------------------

def _ragged_llava_inputs():
    """Sample 0: two images side by side (72 visual tokens, one pool); sample 1: one (36), left-padded."""
    gen = torch.Generator().manual_seed(5)
    words = torch.randint(3, 500, (2, 12), generator=gen)
    s0 = torch.cat([words[0, :4], torch.full((72,), IMG), words[0, 4:]])
    s1 = torch.cat([words[1, :7], torch.full((36,), IMG), words[1, 7:]])
    pad = len(s0) - len(s1)
    input_ids = torch.stack([s0, torch.cat([torch.zeros(pad, dtype=torch.long), s1])])
    mask = torch.ones_like(input_ids)
    mask[1, :pad] = 0
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 84, 84, generator=gen)}


def _alone(inputs, b, images):
    keep = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
            "pixel_values": inputs["pixel_values"][images]}


@pytest.mark.parametrize("ragged", [False, True], ids=["left_padded", "ragged"])
def test_batch_equals_samples_alone(llava, ragged):
    pruning = SwiftVLM(layers=(3, 11, 15), budget_ratio=0.4)
    if ragged:
        inputs, images = _ragged_llava_inputs(), [[0, 1], [2]]
    else:
        inputs, images = tiny_inputs(3, left_pad=3), [[0], [1], [2]]
    with torch.no_grad():
        hf.apply(llava, pruning, backend=BACKEND)
        pos = cumsum_positions(inputs["attention_mask"])
        logits = llava(**inputs, position_ids=pos).logits[:, -1]
        kept = hf.last_prefill(llava).kept
        ids = llava.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **GREEDY)[:, -4:]
        for b, imgs in enumerate(images):
            one = _alone(inputs, b, imgs)
            alone = llava(**one).logits[:, -1]
            torch.testing.assert_close(logits[b:b + 1], alone, atol=1e-5, rtol=0)
            for s, k in enumerate(hf.last_prefill(llava).kept):
                assert torch.equal(kept[s][b, :k.shape[1]], k[0]) and (kept[s][b, k.shape[1]:] == -1).all()
            assert torch.equal(ids[b:b + 1], llava.generate(**one, max_new_tokens=4, min_new_tokens=4, **GREEDY)[:, -4:])


# -- Qwen2-VL: M-RoPE positions -------------------------------------------------------------------

Q_IMG, Q_VS, Q_VE = 250, 251, 252


def _qwen_text(num_layers):
    return dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


_QWEN_TOKENS = dict(image_token_id=Q_IMG, video_token_id=253, vision_start_token_id=Q_VS, vision_end_token_id=Q_VE,
                    attn_implementation="sdpa", bos_token_id=1, eos_token_id=2)


def tiny_qwen2_vl(num_layers=6):
    """A random tiny Qwen2-VL (seed 0): 64 wide, 4 query heads on 2 KV heads, one vision block."""
    cfg = transformers.Qwen2VLConfig(
        text_config=_qwen_text(num_layers),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3), **_QWEN_TOKENS)
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(cfg).eval()


def tiny_qwen2_5_vl(num_layers=4):
    """A random tiny Qwen2.5-VL (seed 0): Qwen2-VL's text model, a two-block windowed vision tower."""
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=_qwen_text(num_layers),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=64, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=8,
                           fullatt_block_indexes=[1]), **_QWEN_TOKENS)
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def qwen():
    model = tiny_qwen2_vl()
    yield model
    hf.apply(model, None)


def qwen_inputs(grids, seed=0):
    """A left-padded batch, one image per sample (grid [t, h, w] in patches; tokens = t*h*w / 4)."""
    gen = torch.Generator().manual_seed(seed)
    rows, pixels = [], []
    for b, (t, h, w) in enumerate(grids):
        before, after = 2 + b, 5 - b
        rows.append(torch.cat([torch.randint(3, 200, (before,), generator=gen), torch.tensor([Q_VS]),
                               torch.full((t * h * w // 4,), Q_IMG), torch.tensor([Q_VE]),
                               torch.randint(3, 200, (after,), generator=gen)]))
        pixels.append(torch.randn(t * h * w, 24, generator=gen))
    L = max(len(r) for r in rows)
    input_ids = torch.stack([torch.cat([torch.zeros(L - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.arange(L) >= L - len(r) for r in rows]).long()
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.cat(pixels),
            "image_grid_thw": torch.tensor(grids), "mm_token_type_ids": (input_ids == Q_IMG).int()}


def test_qwen2vl_keep_all_is_hf_exactly(qwen):
    inputs = qwen_inputs([[1, 8, 8], [1, 8, 8]])
    with torch.no_grad():
        hf.apply(qwen, None)
        ref = qwen(**inputs).logits
        ref_ids = qwen.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **GREEDY)
        hf.apply(qwen, SwiftVLM(layers=(2, 3, 5), keep=(16, 16, 16), merge=(0, 0)), backend=BACKEND)
        assert torch.equal(qwen(**inputs).logits, ref)
        assert torch.equal(qwen.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **GREEDY), ref_ids)


def test_qwen2vl_positions_kept_and_decode_continues(qwen):
    """Kept tokens keep their M-RoPE positions (the rotary tables carried), and decoding after a
    pruned prefill uses the positions of the unpruned model (rope_deltas), not a pruned length."""
    inputs = qwen_inputs([[1, 8, 8], [1, 4, 8]])
    seen = []
    handle = qwen.model.language_model.rotary_emb.register_forward_hook(lambda mod, args, out: seen.append(args[1]) and None)
    try:
        with torch.no_grad():
            hf.apply(qwen, None)
            qwen.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **GREEDY)
            ref, seen[:] = list(seen), []
            hf.apply(qwen, FastV(layer=2, budget_ratio=0.5), backend=BACKEND)
            qwen.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    finally:
        handle.remove()
    assert len(seen) == len(ref) == 3
    for a, b in zip(seen, ref):
        assert torch.equal(a, b)
    lengths = hf.last_prefill(qwen).layer_lengths
    assert lengths[0] > lengths[-1]  # pruned


def test_qwen2vl_ragged_batch_equals_samples_alone(qwen):
    """Dynamic resolution: 16 and 8 visual tokens in one batch (the ragged ops)."""
    grids = [[1, 8, 8], [1, 4, 8]]
    inputs = qwen_inputs(grids)
    with torch.no_grad():
        hf.apply(qwen, SwiftVLM(layers=(2, 3, 5), budget_ratio=0.6), backend=BACKEND)
        logits = qwen(**inputs).logits[:, -1]
        kept = hf.last_prefill(qwen).kept
        ids = qwen.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **GREEDY)[:, -3:]
        start = 0
        for b, (t, h, w) in enumerate(grids):
            keep = inputs["attention_mask"][b].bool()
            one = {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
                   "pixel_values": inputs["pixel_values"][start:start + t * h * w],
                   "image_grid_thw": inputs["image_grid_thw"][b:b + 1],
                   "mm_token_type_ids": inputs["mm_token_type_ids"][b:b + 1, keep]}
            start += t * h * w
            torch.testing.assert_close(logits[b:b + 1], qwen(**one).logits[:, -1], atol=1e-5, rtol=0)
            for s, k in enumerate(hf.last_prefill(qwen).kept):
                assert torch.equal(kept[s][b, :k.shape[1]], k[0])
            assert torch.equal(ids[b:b + 1], qwen.generate(**one, max_new_tokens=3, min_new_tokens=3, **GREEDY)[:, -3:])


# -- errors -----------------------------------------------------------------------------------------

def test_apply_errors(llava):
    with pytest.raises(ValueError, match="model: expected one of"):
        hf.apply(torch.nn.Linear(2, 2), FastV())
    with pytest.raises(ValueError, match="pruning: expected None"):
        hf.apply(llava, "fastv")
    hf.apply(llava, FastV(layer=2, budget_ratio=0.5), backend=BACKEND)
    split = tiny_inputs(1)
    start = int((split["input_ids"][0] == IMG).int().argmax())
    split["input_ids"][0, start + 10] = 7  # text inside the image span
    split["input_ids"] = torch.cat([split["input_ids"], torch.full((1, 1), IMG)], 1)
    split["attention_mask"] = torch.ones_like(split["input_ids"])
    with pytest.raises(ValueError, match="not contiguous"), torch.no_grad():
        llava(**split)
    right = tiny_inputs(2)
    right["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="left padding only"), torch.no_grad():
        llava(**right)
    assert hf.default_layers(32) == (3, 11, 15)
    assert hf.default_layers(28) == (3, 10, 13)
    with pytest.raises(ValueError, match="num_layers"):
        hf.default_layers(3)
    for depth in range(4, 81):  # valid plans at every depth: increasing, the first stages before the last layer
        SwiftVLM(layers=hf.default_layers(depth), keep=(4, 4, 4)).plan(36, depth)
        pdrop = hf.default_layers(depth, "pdrop")
        PDrop(layers=pdrop, keep=(4,) * len(pdrop)).plan(36, depth)
    assert isinstance(hf.default_method(llava, "pdrop", budget_ratio=0.5), PDrop)


def test_transformers_floor_is_checked_and_matches_pyproject():
    import re
    from pathlib import Path

    from swiftvlm_kernels.hf.compat import MIN_TRANSFORMERS, check_release

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floors = set(re.findall(r'"transformers>=([0-9.]+)"', pyproject))
    assert floors == {".".join(map(str, MIN_TRANSFORMERS))}
    check_release("5.17.0")
    check_release("6.0.0.dev0")
    for old in ("5.16.1", "4.57.6", "nonsense"):
        with pytest.raises(ValueError, match="transformers: pruning a transformers model needs transformers >= 5.17"):
            check_release(old)


# -- LLaVA-NeXT: anyres, a different visual-token count per image after padding removal -------------

def tiny_llava_next(num_layers=6):
    """A random tiny LLaVA-NeXT (seed 0): the tiny LLaVA's towers, 28 px tiles, anyres grids up to 56 px."""
    c = tiny_llava_config()
    cfg = transformers.LlavaNextConfig(
        vision_config=dict(c["vision_config"], image_size=28),
        text_config=dict(c["text_config"], num_hidden_layers=num_layers),
        image_token_index=IMG, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlavaNextForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def llava_next():
    model = tiny_llava_next()
    yield model
    hf.apply(model, None)


def next_inputs(model, sizes, seed=0):
    """Left-padded prompts with as many image tokens as each image's unpadded features (14 and 16)."""
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(sizes), 5, 3, 28, 28, generator=gen)
    sizes = torch.tensor(sizes)
    with torch.no_grad():
        counts = [f.shape[0] for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    rows = [torch.cat([torch.randint(3, 500, (2 + b,), generator=gen), torch.full((n,), IMG),
                       torch.randint(3, 500, (4,), generator=gen)]) for b, n in enumerate(counts)]
    L = max(len(r) for r in rows)
    input_ids = torch.stack([torch.cat([torch.zeros(L - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.arange(L) >= L - len(r) for r in rows]).long()
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values, "image_sizes": sizes}, counts


def _next_batch_equals_samples_alone(llava_next, inputs):
    """The patched LLaVA-NeXT on a padded batch of two: each sample's last logits and 3 greedy ids
    equal the sample's run alone (its padding removed)."""
    logits = llava_next(**inputs, position_ids=cumsum_positions(inputs["attention_mask"])).logits[:, -1]
    ids = llava_next.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **GREEDY)[:, -3:]
    for b in range(2):
        keep = inputs["attention_mask"][b].bool()
        alone = {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
                 "pixel_values": inputs["pixel_values"][b:b + 1], "image_sizes": inputs["image_sizes"][b:b + 1]}
        torch.testing.assert_close(logits[b:b + 1], llava_next(**alone).logits[:, -1], atol=1e-5, rtol=0)
        assert torch.equal(ids[b:b + 1], llava_next.generate(**alone, max_new_tokens=3, min_new_tokens=3, **GREEDY)[:, -3:])


def test_llava_next_keep_all_and_ragged_batch(llava_next):
    inputs, counts = next_inputs(llava_next, [[28, 56], [56, 40]])
    assert counts[0] != counts[1]
    with torch.no_grad():
        hf.apply(llava_next, None)
        one = {k: v[1:] for k, v in inputs.items()}  # the longer prompt: no padding
        assert one["attention_mask"].all()
        ref = llava_next(**one).logits
        hf.apply(llava_next, SwiftVLM(layers=(2, 3, 5), keep=(counts[1],) * 3, merge=(0, 0)), backend=BACKEND)
        assert torch.equal(llava_next(**one).logits, ref)  # keep-all: HF's logits exactly
        hf.apply(llava_next, PDrop(layers=(2, 3, 4), budget_ratio=0.6), backend=BACKEND)
        _next_batch_equals_samples_alone(llava_next, inputs)


# -- PDrop as its official code does it --------------------------------------------------------------

def test_pdrop_official_variant(llava):
    """Layer x + 1's query and keys on layer x's output; positions renumbered after a drop, in the
    prefill and in decoding. Reference: a plain loop over HF's layers that gathers the kept rows."""
    pruning = PDrop(layers=(2, 6, 10), budget_ratio=0.5, official=True)
    inputs = tiny_inputs(2)
    ids = inputs["input_ids"]
    B, L = ids.shape
    with torch.no_grad():
        hf.apply(llava, pruning, backend=BACKEND)
        out = llava(**inputs)
        got, record = out.logits[:, -1], hf.last_prefill(llava)
        token = got.argmax(-1)
        step = llava(input_ids=token[:, None], **{cache_parameter(llava): output_cache(out)},
                     position_ids=torch.full((B, 1), L)).logits[:, -1]
        hf.apply(llava, None)
        h = _embeds(llava, inputs)
        text = llava.model.language_model
        layers = text.layers
        cache = transformers.DynamicCache(config=text.config)
        start = (ids == IMG).int().argmax(1)
        rows = torch.arange(L).expand(B, L)  # input index of each row
        pos = rows
        shifts = []
        for i, layer in enumerate(layers, start=1):
            cos, sin = text.rotary_emb(h, pos)
            shifts.append(rows.shape[1])
            h = layer(h, attention_mask=None, position_embeddings=(cos, sin), use_cache=True,
                      **{cache_parameter(layer): cache})
            s = record.plan.stage_after(i)
            if s is None:
                continue
            nxt = layers[i]
            x = nxt.input_layernorm(h)
            D = nxt.self_attn.head_dim
            q = nxt.self_attn.q_proj(x[:, -1:]).view(B, 1, -1, D).transpose(1, 2)
            k = nxt.self_attn.k_proj(x).view(B, rows.shape[1], -1, D).transpose(1, 2)
            q = q * cos[:, None, -1:] + torch.cat([-q[..., D // 2:], q[..., :D // 2]], -1) * sin[:, None, -1:]
            k = k * cos[:, None] + torch.cat([-k[..., D // 2:], k[..., :D // 2]], -1) * sin[:, None]
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            p = torch.softmax((q @ k.transpose(-1, -2))[:, :, 0] * D ** -0.5, -1).mean(1)  # [B, n]
            visual = (rows >= start[:, None]) & (rows < start[:, None] + 36)
            score = torch.where(visual, p, -1.0)
            keep_n = record.plan.stages[s].keep
            top = score.topk(keep_n, -1).indices
            keep = ~visual
            keep[torch.arange(B)[:, None], top] = True
            sel = torch.stack([keep[b].nonzero()[:, 0] for b in range(B)])
            assert torch.equal(rows.gather(1, sel)[visual.gather(1, sel)].view(B, keep_n) - start[:, None],
                               record.kept[s])
            h, rows = h[torch.arange(B)[:, None], sel], rows.gather(1, sel)
            pos = torch.arange(rows.shape[1]).expand(B, -1)  # renumbered
        want = llava.lm_head(text.norm(h))[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # decoding: layer l's cache holds shifts[l] rows; the new token's position there is L - (L - rows)
        e = text.embed_tokens(token[:, None])
        for layer, n_l in zip(layers, shifts):
            cached = cache.layers[layer.self_attn.layer_idx]
            assert cached.keys.shape[2] == n_l and cached.values.shape[2] == n_l
        e_pos = torch.full((B, 1), L)
        for layer, n_l in zip(layers, shifts):
            cos, sin = text.rotary_emb(e, e_pos - (L - n_l))
            e = layer(e, attention_mask=None, position_embeddings=(cos, sin), use_cache=True,
                      **{cache_parameter(layer): cache})
        torch.testing.assert_close(step, llava.lm_head(text.norm(e))[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="official"):
        LlavaForward.from_config(tiny_llava_config()).plan_for(pruning)


def test_pdrop_official_ragged_batch_equals_samples_alone(llava_next):
    inputs, _ = next_inputs(llava_next, [[28, 56], [56, 40]], seed=1)
    with torch.no_grad():
        hf.apply(llava_next, PDrop(layers=(2, 3, 4), budget_ratio=0.6, official=True), backend=BACKEND)
        _next_batch_equals_samples_alone(llava_next, inputs)


# -- the layer-selection profiler (Sec. 3.2) on a transformers model ------------------------------

def test_layer_profile_matches_minimal_forward(llava, ours):
    from swiftvlm_kernels.pruning import layer_profile

    samples = [tiny_inputs(2, seed=1)]
    tok = 17
    hf.apply(llava, None)
    with torch.no_grad():
        got = layer_profile(llava, samples, lambda s, out: out.logits[:, -1, tok].mean(), keep_ratio=0.25)
        want = layer_profile(ours, samples, lambda s, out: out.last_logits[:, tok].mean(), keep_ratio=0.25)
    assert not hf.is_applied(llava)  # restored
    assert len(got) == 16 and len(set(round(x, 4) for x in got)) > 1  # the layers' selections differ
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


def test_qwen2_5_vl_shares_the_path():
    model = tiny_qwen2_5_vl()
    grids = [[1, 8, 8], [1, 4, 8]]
    inputs = qwen_inputs(grids)
    alone = []
    for b, (t, h, w) in enumerate(grids):
        keep = inputs["attention_mask"][b].bool()
        first = sum(g[0] * g[1] * g[2] for g in grids[:b])
        alone.append({"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
                      "pixel_values": inputs["pixel_values"][first:first + t * h * w],
                      "image_grid_thw": inputs["image_grid_thw"][b:b + 1],
                      "mm_token_type_ids": inputs["mm_token_type_ids"][b:b + 1, keep]})
    with torch.no_grad():
        ref = model(**alone[0]).logits
        hf.apply(model, SwiftVLM(layers=(2, 3), keep=(16, 16), merge=(0,)), backend=BACKEND)
        assert torch.equal(model(**alone[0]).logits, ref)
        hf.apply(model, FastV(layer=2, budget_ratio=0.5), backend=BACKEND)
        logits = model(**inputs).logits[:, -1]
        ids = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **GREEDY)[:, -3:]
        for b in range(2):
            torch.testing.assert_close(logits[b:b + 1], model(**alone[b]).logits[:, -1], atol=1e-5, rtol=0)
            assert torch.equal(ids[b:b + 1], model.generate(**alone[b], max_new_tokens=3, min_new_tokens=3, **GREEDY)[:, -3:])


def test_qwen2vl_drop_only_equals_masking(qwen):
    """semantics.md property 3 with M-RoPE: kept tokens keep their three-axis positions."""
    inputs = qwen_inputs([[1, 8, 8], [1, 8, 8]], seed=3)
    ids = inputs["input_ids"]
    B, L = ids.shape
    assert inputs["attention_mask"].all()
    with torch.no_grad():
        hf.apply(qwen, PDrop(layers=(2, 4), budget_ratio=0.6), backend=BACKEND)
        got = qwen(**inputs).logits[:, -1]
        plan, kept = hf.last_prefill(qwen).plan, hf.last_prefill(qwen).kept
        hf.apply(qwen, None)
        seen = {}
        text = qwen.model.language_model
        handle = text.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
        try:
            qwen(**inputs)
        finally:
            handle.remove()
        h, pos = seen["inputs_embeds"], seen["position_ids"]
        assert pos.shape == (3, B, L) and not torch.equal(pos[0], pos[1])  # M-RoPE: the axes differ
        cos, sin = text.rotary_emb(h, pos)
        start = (ids == Q_IMG).int().argmax(1)
        n_vis = int((ids[0] == Q_IMG).sum())
        valid = torch.ones(B, L, dtype=torch.bool)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        for i, layer in enumerate(text.layers, start=1):
            h = layer(h, attention_mask=(causal & valid[:, None, :])[:, None], position_embeddings=(cos, sin))
            s = plan.stage_after(i)
            if s is not None:
                visual = torch.zeros(B, L, dtype=torch.bool)
                visual[torch.arange(B)[:, None], start[:, None] + torch.arange(n_vis)] = True
                keep = torch.zeros(B, L, dtype=torch.bool)
                keep[torch.arange(B)[:, None], start[:, None] + kept[s]] = True
                valid = ~visual | keep
        want = qwen.lm_head(text.norm(h))[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -- a patched model is an ordinary model: copies, pickles, and refuses what it cannot do -------------

def test_a_deep_copy_runs_its_own_weights(llava_dir):
    import copy

    model = hf_llava(llava_dir)
    pruning = SwiftVLM(layers=(3, 11, 15), budget_ratio=0.4)
    inputs = tiny_inputs(2, left_pad=2)
    with torch.no_grad():
        hf.apply(model, pruning, backend=BACKEND)
        want = model(**inputs).logits
        twin = copy.deepcopy(model)
        assert hf.is_applied(twin) and hf.last_prefill(twin) is None
        for p in twin.model.language_model.layers[5].parameters():
            p.mul_(1.5)  # the copy's own weights from now on
        got = twin(**inputs).logits
        # the same perturbation on an unpatched copy, patched afterwards: what the twin must compute
        hf.apply(model, None)
        ref_model = copy.deepcopy(model)
        for p in ref_model.model.language_model.layers[5].parameters():
            p.mul_(1.5)
        hf.apply(ref_model, pruning, backend=BACKEND)
        assert torch.equal(got, ref_model(**inputs).logits)
        assert not torch.equal(got, want)
        hf.apply(model, pruning, backend=BACKEND)
        assert torch.equal(model(**inputs).logits, want)  # the original is untouched
        assert hf.last_prefill(twin).token_index.shape[0] == 2


def test_torch_save_and_load_keep_the_patch(llava_dir, tmp_path):
    """torch.save stores the unpatched classes and the pruning setting; loading re-applies it. (Saved
    before the first forward: transformers >= 5.2x installs a local-function hook on a model's first
    forward that no pickler can store, patched or not.)"""
    model = hf_llava(llava_dir)
    inputs = tiny_inputs(2, left_pad=1)
    with torch.no_grad():
        hf.apply(model, FastV(layer=2, budget_ratio=0.5), backend=BACKEND)
        torch.save(model, tmp_path / "model.pt")
        want = model(**inputs).logits
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)  # this test's own file
        assert hf.is_applied(loaded) and type(loaded) is type(model)
        assert torch.equal(loaded(**inputs).logits, want)
        hf.apply(loaded, None)
        assert type(loaded) is transformers.LlavaForConditionalGeneration
        assert loaded(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]  # unpruned again


def test_generate_without_cache_and_labels_are_refused_clearly(llava):
    inputs = tiny_inputs(2)
    with torch.no_grad():
        hf.apply(llava, FastV(layer=2, budget_ratio=0.5), backend=BACKEND)
        with pytest.raises(ValueError, match="^use_cache: generating without a KV cache"):
            llava.generate(**inputs, max_new_tokens=2, use_cache=False, **GREEDY)
        with pytest.raises(ValueError, match="^labels: a patched model computes no loss"):
            llava(**inputs, labels=inputs["input_ids"])
        ids = llava.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **GREEDY)  # with the cache: fine
        assert ids.shape[1] == inputs["input_ids"].shape[1] + 2
        hf.apply(llava, None)
        assert llava(**inputs, labels=inputs["input_ids"]).loss is not None
