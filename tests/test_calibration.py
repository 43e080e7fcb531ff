"""ALVTS calibration (swiftvlm_kernels/pruning/calibration.py) and `python -m swiftvlm_kernels calibrate`: a
short seeded run lowers every layer's held-out loss on the trained tiny LLaVA, the record is written and loads
back, a re-run writes byte-identical files, the command's errors exit 2 / 1 with one line before anything is
loaded, and the shipped selector is the one eval and the demo use."""
import json

import pytest
import torch

import python_ref
from swiftvlm_kernels.apps import calibrate as calibrate_app
from swiftvlm_kernels.apps import evaluation
from swiftvlm_kernels.apps.cli import main
from swiftvlm_kernels.apps.trained import TRAINED_DIR, checkpoint_selector, trained_tiny_llava
from swiftvlm_kernels.models.llava import LlavaForward
from swiftvlm_kernels.pruning import ALVTS, Selector, calibration
from swiftvlm_kernels.pruning.selector import RECORD, TENSORS


@pytest.fixture(scope="module")
def model():
    return trained_tiny_llava().eval()


@pytest.fixture(scope="module")
def calibrated(model):
    """A short seeded run: 24 samples (18 fit, 6 held out), rank 8, 30 steps per layer."""
    items = calibrate_app.calibration_items(None, 24)
    train, held = calibrate_app.held_out_split(len(items), seed=3)
    prompts = evaluation.prompts_for(None, model)
    inputs = [evaluation.batch_inputs([items[i] for i in part], prompts, model) for part in (train, held)]
    return calibration.calibrate(model, *inputs, 8, steps=30, lr=3e-3, seed=3, progress=False)


def test_short_run_lowers_every_layers_held_out_loss(calibrated):
    record = calibrated.record["calibration"]
    assert calibrated.layers == tuple(range(2, 13)) and calibrated.rank == 8 and calibrated.hidden_size == 128
    assert record["samples"] == {"train": 18, "held_out": 6} and record["seed"] == 3 and record["steps"] == 30
    assert set(record["per_layer"]) == {str(layer) for layer in range(2, 13)}
    for layer, r in record["per_layer"].items():
        assert r["loss_after"] < r["loss_before"], layer
        for name in ("spearman", "top_third_overlap", "top_third_mass"):
            assert -1 <= r[f"{name}_before"] <= 1 and -1 <= r[f"{name}_after"] <= 1


def test_record_is_written_and_loads_back(calibrated, model, tmp_path):
    path = calibrated.save(tmp_path / "sel")
    doc = json.loads((path / RECORD).read_text())
    assert doc["rank"] == 8 and doc["init"] == "svd+calibration" and doc["calibration"] == calibrated.record["calibration"]
    loaded = Selector.load(path)
    assert loaded.record["calibration"] == calibrated.record["calibration"]
    assert all(torch.equal(a, b) for layer in loaded.layers for a, b in zip(loaded.weights[layer], calibrated.weights[layer]))
    items = evaluation.synthetic_items(3)
    inputs = evaluation.batch_inputs(items, evaluation.prompts_for(None, model), model)
    a, b = (model(**inputs, pruning=ALVTS(budget_ratio=0.25, selector=s)) for s in (calibrated, loaded))
    assert torch.equal(a.last_logits, b.last_logits) and all(torch.equal(x, y) for x, y in zip(a.kept, b.kept))


def test_importance_is_the_engines_and_the_target_the_layers_own(model):
    """S from calibration.importance is attention_importance of the selector's q~, k~ (what the engine
    scores with); S* is the layer's own importance from its real queries and keys after RoPE."""
    items = evaluation.synthetic_items(2)
    inputs = evaluation.batch_inputs(items, evaluation.prompts_for(None, model), model)
    data = calibration.collect(model, inputs, (3,))
    selector = Selector.from_layers(model.language_model.layers, (3,), 8)
    wq, wk = selector.weights[3]
    x = data.x[3]
    t2v, v2v = torch.ops.swiftvlm.attention_importance((x @ wq)[:, None], (x @ wk)[:, None], data.vis_start, 144,
                                                        8 ** -0.5, data.key_mask)
    S = calibration.importance(x, wq, wk, data.vis_start, 144, data.key_mask)
    torch.testing.assert_close(S, t2v * v2v, rtol=1e-4, atol=1e-9)
    out = model(**inputs, output_hidden_states=True)  # the target from scratch: layer 3's q / k after RoPE
    layer = model.language_model.layers[2]
    mask = inputs["attention_mask"]
    cos, sin = model.rope_table((mask.long().cumsum(1) - 1).clamp_min(0), torch.float32).unbind(2)
    xn = layer.input_layernorm(out.hidden_states[2])
    q, k = layer.self_attn.query(xn, cos, sin).transpose(1, 2), layer.self_attn.keys(xn, cos, sin).transpose(1, 2)
    want = python_ref.attention_importance(q, k, data.vis_start, 144, 32 ** -0.5, mask)
    torch.testing.assert_close(data.target[3], want[0] * want[1])


def test_metrics():
    S = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    T = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 1.0, 2.0, 3.0]])
    # row 0: perfect; row 1: ranks (3, 2, 1, 0) against (0.5, 0.5, 2, 3) -> -0.9487
    assert calibration.spearman(S, T) == pytest.approx((1 - 0.9486833) / 2, abs=1e-6)
    assert calibration.top_overlap(S, T, 2) == pytest.approx(0.5)  # row 0 both, row 1 neither
    assert calibration.top_mass(S, T, 2) == pytest.approx((70 + 2) / (100 + 7))


def test_loss_is_the_divergence_of_the_normalised_importances():
    S = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    T = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 1.0, 2.0, 3.0]])
    p, q = T / T.sum(1, keepdim=True), S / S.sum(1, keepdim=True)
    want = (p * (p / q).log()).sum(1).mean()
    torch.testing.assert_close(calibration.loss(S, T), want)
    torch.testing.assert_close(calibration.loss(1e-6 * S, 7 * T), want)  # scale-free on both sides
    assert calibration.loss(S[:1], T[:1]) < 1e-7  # S proportional to S*: nothing to fit
    assert torch.isfinite(calibration.loss(torch.zeros(1, 4), T[:1]))  # an importance that underflows
    assert calibration.loss(S, torch.zeros(2, 4)) == 0  # rows of S* that sum to 0 add nothing


def _calibrate_cli(out, *extra):
    return main(["calibrate", "--samples", "8", "--steps", "3", "--rank", "4", "--layers", "2:5", "--out", str(out),
                 *extra])


def test_rerun_with_the_same_seed_is_byte_identical(tmp_path, capsys):
    assert _calibrate_cli(tmp_path / "a", "--seed", "7") == 0
    out = capsys.readouterr().out
    assert "6 training / 2 held-out samples; rank 4" in out and "wrote" in out
    assert _calibrate_cli(tmp_path / "b", "--seed", "7") == 0
    for name in (RECORD, TENSORS):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    record = json.loads((tmp_path / "a" / RECORD).read_text())["calibration"]
    assert record["seed"] == 7 and record["layers"] == [2, 5] and record["data"].startswith("synthetic VQA, split 2")
    assert _calibrate_cli(tmp_path / "c", "--seed", "8") == 0  # another seed: another held-out draw
    assert json.loads((tmp_path / "c" / RECORD).read_text())["calibration"]["per_layer"] != record["per_layer"]


@pytest.mark.parametrize("args, words", [
    (["--rank", "0"], "argument --rank: expected an int >= 1, got 0"),
    (["--rank", "x"], "argument --rank: invalid positive value: 'x'"),
    (["--samples", "3"], "argument --samples: expected an int >= 4"),
    (["--lr", "-1"], "argument --lr: expected a positive number"),
    (["--seed", "-2"], "argument --seed: expected an int in [0, 2147483647], got -2"),
    (["--layers", "3:2"], "argument --layers: expected strictly increasing layers"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--out", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and words in err, err


def test_missing_out_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--rank", "4"])
    assert exit_.value.code == 2 and "the following arguments are required: --out" in capsys.readouterr().err


@pytest.mark.parametrize("case, words", [
    ("rank", "--rank: expected at most the model's hidden size 128, got 129"),
    ("layers", "--layers: expected layers in [1, 12] (the model's), got 2:13"),
    ("model", "--model: expected a checkpoint directory with config.json and model.safetensors"),
    ("data", "--data: expected a folder holding questions.jsonl"),
    ("out", "--out: expected a directory (or a new path), got the file"),
])
def test_bad_values_and_paths_exit_1_with_one_line_before_anything_loads(tmp_path, capsys, monkeypatch, case, words):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(LlavaForward, "from_pretrained", refuse)
    (tmp_path / "file").write_text("x")
    args = {"rank": ["--rank", "129"], "layers": ["--layers", "2:13"], "model": ["--model", str(tmp_path / "none")],
            "data": ["--data", str(tmp_path)], "out": []}[case]
    out = tmp_path / ("file" if case == "out" else "s")
    assert main(["calibrate", "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m swiftvlm_kernels calibrate: error: ") and words in err


def test_too_few_dataset_questions_is_an_error(tmp_path, capsys):
    (tmp_path / "questions.jsonl").write_text("")
    assert main(["calibrate", "--data", str(tmp_path), "--samples", "4", "--out", str(tmp_path / "s")]) == 1
    assert "holds no questions" in capsys.readouterr().err


def test_the_shipped_selector_is_calibrated_and_used_by_default():
    shipped = checkpoint_selector()
    assert shipped is not None and (TRAINED_DIR / "alvts-selector" / TENSORS).stat().st_size < 2 ** 20
    record = shipped.record["calibration"]
    assert shipped.layers == tuple(range(2, 13)) and shipped.rank == record["rank"]
    for r in record["per_layer"].values():  # what the README says of it, at every layer
        assert r["loss_after"] < r["loss_before"] and r["spearman_after"] > r["spearman_before"]
        assert r["top_third_mass_after"] > max(r["top_third_mass_before"], 0.94)
    model = trained_tiny_llava()
    selector, about = evaluation.load_selector(None, model, None, shipped.layers)
    assert about.startswith("the checkpoint's alvts-selector/: svd+calibration") and selector.rank == shipped.rank
    assert evaluation.load_selector("svd:8", model, None, (2, 3))[1] == "svd, rank 8"
