"""`python -m swiftvlm_kernels eval` (swiftvlm_kernels/apps/evaluation/) and the embedded trained tiny
LLaVA: the shipped weights reach their recorded accuracy exactly, the evaluation's prompts are the
training's, its outputs agree with each other, and dataset folders are read like the synthetic set
and validated."""
import csv
import json

import pytest
import torch

from swiftvlm_kernels.apps import evaluation, synth
from swiftvlm_kernels.apps.cli import main as cli_main
from swiftvlm_kernels.apps.png import read_png, write_png
from swiftvlm_kernels.apps.trained import (TRAINED_DIR, trained_prompt, trained_record, trained_tiny_llava,
                                           trained_vocab)

@pytest.fixture(scope="module")
def model():
    m = trained_tiny_llava()
    m.eval()
    return m


def test_shipped_weights_are_small_and_complete():
    size = (TRAINED_DIR / "model.safetensors").stat().st_size
    assert size <= 20 * 2**20
    assert trained_vocab() == synth.VOCAB
    record = trained_record()
    assert record["held_out"]["n"] >= 1000 and set(record["held_out"]["per_kind"]) == set(synth.KINDS)


def test_shipped_weights_reach_the_recorded_accuracy_exactly(model, train_tiny):
    record = trained_record()["slice"]
    train = train_tiny
    assert train.evaluate(model, record["n"], question_first=trained_prompt()["question_first"]) == record


def test_eval_prompts_are_the_trainings(model, train_tiny):
    """The evaluation's vanilla answers on the synthetic set are the training script's predictions."""
    n = 64
    items = evaluation.synthetic_items(n)
    prompts = evaluation.prompts_for(None, model)
    (res,) = evaluation.evaluate(model, items, prompts, methods=("vanilla",))
    samples = [synth.sample(1, i) for i in range(n)]
    inputs = synth.batch(samples, model.num_visual_tokens, question_first=trained_prompt()["question_first"])
    with torch.no_grad():
        pred = train_tiny.answer_logits(model, inputs).argmax(-1)
    assert sum(res.right.values()) == int((pred == inputs["answers"]).sum())
    assert res.target_share() == 1.0  # unpruned: every answer patch reaches the last layer
    assert res.outcomes == (pred == inputs["answers"]).int().tolist()  # each question's outcome, in order
    assert res.question_kinds == [s.kind for s in samples]


def test_eval_reproduces_the_recorded_slice_and_its_interval(model):
    """The first 200 held-out questions, as the training recorded them: the same accuracy, overall and
    per kind, now with a 95 % Wilson interval around it."""
    record = trained_record()["slice"]
    items = evaluation.synthetic_items(record["n"])
    (res,) = evaluation.evaluate(model, items, evaluation.prompts_for(None, model), methods=("vanilla",),
                                 batch_size=100)
    assert res.accuracy() == pytest.approx(record["accuracy"], abs=1e-12)
    assert {k: res.accuracy(k) for k in synth.KINDS} == pytest.approx(record["per_kind"], abs=1e-12)
    lo, hi = res.interval()
    assert (lo, hi) == evaluation.wilson(sum(res.right.values()), record["n"])
    assert lo < record["accuracy"] < hi and 0.12 < hi - lo < 0.15  # about +- 7 points at 200 questions


def test_wilson_interval_matches_known_values():
    assert evaluation.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert evaluation.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # not empty at 0 right
    assert evaluation.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert evaluation.wilson(1050, 2000) == pytest.approx((0.5031, 0.5468), abs=1e-4)
    assert evaluation.wilson(0, 0) is None
    with pytest.raises(ValueError, match="right: expected a count in"):
        evaluation.wilson(3, 2)


def test_paired_interval_is_the_normal_interval_of_the_mean_difference():
    # differences 1, 0, 0, -1: mean 0, sample sd sqrt(2/3), half-width 1.96 * sqrt(2/3 / 4)
    mean, lo, hi = evaluation.paired_interval([1, 1, 0, 0], [0, 1, 0, 1])
    assert mean == 0 and hi == pytest.approx(evaluation.stats.Z95 * (2 / 3 / 4) ** 0.5) and lo == -hi
    # pairing: 200 questions, a right on 20 more than b and agreeing elsewhere: a clear difference, though
    # the two accuracies' own intervals overlap
    a, b = [1] * 120 + [0] * 80, [1] * 100 + [0] * 100
    mean, lo, hi = evaluation.paired_interval(a, b)
    assert mean == pytest.approx(0.1) and 0.05 < lo < 0.1 < hi < 0.15
    assert evaluation.wilson(120, 200)[0] < evaluation.wilson(100, 200)[1]
    assert evaluation.paired_interval([1, 0], [1, 0]) == (0.0, 0.0, 0.0)
    assert evaluation.paired_interval([], []) is None
    with pytest.raises(ValueError, match="b: expected outcomes for the same 2 questions"):
        evaluation.paired_interval([1, 0], [1])


def test_paired_differences_pair_runs_on_the_same_questions():
    def run(method, budget, outcomes, feasible=True):
        kinds = ["colour", "shape"] * (len(outcomes) // 2)
        r = evaluation.Result(method, budget, 1.0, 1.0, feasible=feasible, outcomes=list(outcomes),
                              question_kinds=kinds if feasible else [])
        for k, o in zip(kinds, outcomes):
            r.right[k] = r.right.get(k, 0) + o
            r.total[k] = r.total.get(k, 0) + 1
        return r

    results = [run("vanilla", None, [1, 1, 1, 0]), run("SwiftVLM", 0.5, [1, 1, 0, 0]), run("FastV", 0.5, [0, 1, 1, 0]),
               run("SwiftVLM", 0.2, [1, 0, 0, 0]), run("FastV", 0.2, [], feasible=False)]
    diffs = evaluation.paired_differences(results)
    assert [(d.a, d.a_budget, d.b, d.b_budget) for d in diffs] == [
        ("SwiftVLM", 0.5, "vanilla", None), ("FastV", 0.5, "vanilla", None), ("SwiftVLM", 0.2, "vanilla", None),
        ("SwiftVLM", 0.5, "FastV", 0.5)]  # FastV at 20 % is infeasible: nothing to pair with SwiftVLM there
    for d in diffs:
        a = next(r for r in results if (r.method, r.budget) == (d.a, d.a_budget))
        b = next(r for r in results if (r.method, r.budget) == (d.b, d.b_budget))
        assert d.difference == pytest.approx(a.accuracy() - b.accuracy()) and d.low <= d.difference <= d.high
    (shape,) = [d for d in evaluation.paired_differences(results, "shape") if d.a_budget == 0.2]
    assert (shape.n, shape.difference) == (2, -0.5)  # questions 2 and 4 only
    text = evaluation.table(results)
    assert "paired differences in accuracy (points)" in text
    assert any(line.split()[:4] == ["50%", "SwiftVLM", "FastV", "+0.0"] for line in text.splitlines())


def test_cli_writes_a_consistent_table_csv_json_and_plot(tmp_path, capsys):
    out = tmp_path / "ev"
    assert cli_main(["eval", "--n", "24", "--budgets", "0.5,0.2", "--batch-size", "12", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SwiftVLM" in text and "FastV" in text and "PDrop" in text and "ALVTS" in text and "targets kept" in text
    assert "95% CI" in text.splitlines()[2] and "paired differences in accuracy" in text
    assert "wrote " + str(out / "results.csv") in text and str(out / "differences.csv") in text
    doc = json.loads((out / "results.json").read_text())
    rows = list(csv.DictReader((out / "results.csv").open()))
    diffs = list(csv.DictReader((out / "differences.csv").open()))
    for row in rows:  # every accuracy carries its Wilson interval
        assert (float(row["accuracy_ci_low"]), float(row["accuracy_ci_high"])) == pytest.approx(
            evaluation.wilson(int(row["correct"]), int(row["total"])), abs=1e-4)
        assert float(row["accuracy_ci_low"]) <= float(row["accuracy"]) <= float(row["accuracy_ci_high"])
    kinds = {r["kind"] for r in rows}
    # 8 pruned runs against vanilla, 6 pairs of methods at each of 2 budgets; per kind and overall
    assert len(diffs) == (8 + 2 * 6) * len(kinds) and {d["kind"] for d in diffs} == kinds
    assert len(doc["paired_differences"]["all"]) == 8 + 2 * 6
    by_run = {(r["method"], r["budget"]): r for r in doc["results"]}
    for d in doc["paired_differences"]["all"]:
        a, b = by_run[d["a"], d["a_budget"]], by_run[d["b"], d["b_budget"]]
        assert d["questions"] == 24 and d["difference"] == pytest.approx(a["accuracy"] - b["accuracy"], abs=1e-6)
        assert d["ci"][0] <= d["difference"] <= d["ci"][1]
        paired = evaluation.paired_interval([int(c) for c in a["outcomes"]], [int(c) for c in b["outcomes"]])
        assert d["ci"] == pytest.approx(list(paired[1:]), abs=1e-6)
    for r in doc["results"]:
        assert len(r["outcomes"]) == 24 and r["outcomes"].count("1") == sum(r["correct"].values())
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
        assert set(r["per_kind_ci"]) == set(r["per_kind"])
    assert len(doc["results"]) == 1 + 4 * 2
    assert [r["budget"] for r in doc["results"] if r["method"] == "ALVTS"] == [0.5, 0.2]
    assert doc["settings"]["layers"]["alvts"] == list(range(2, 13))
    assert doc["settings"]["alvts_selector"].startswith("the checkpoint's alvts-selector/: svd+calibration")
    assert sum(x["method"] == "ALVTS" for x in rows) == 2 * (1 + len(synth.KINDS))
    for r in doc["results"]:
        all_row = next(x for x in rows if x["method"] == r["method"] and x["kind"] == "all"
                       and x["budget"] == ("" if r["budget"] is None else f"{r['budget']:.4f}"))
        assert int(all_row["total"]) == 24 and float(all_row["accuracy"]) == pytest.approx(r["accuracy"], abs=1e-4)
        if r["budget"] is not None:  # every method spends the budget it was given
            assert r["visual_tokens_per_layer"] == pytest.approx(r["budget"] * 144, abs=1.0)
    md = (out / "results.md").read_text().split("\n\n")
    lines = md[0].splitlines()
    assert len(lines) == 2 + len(doc["results"]) and lines[2].startswith("| vanilla | 100 % | 144.0 | 100 % |")
    assert lines[0].startswith("| method | budget | tokens / layer | prefill FLOPs | all | 95 % CI | colour |")
    assert md[1].startswith("Paired differences") and len(md[2].splitlines()) == 2 + 8 + 2 * 6
    png = read_png(out / "accuracy.png")
    assert png.shape[0] == 3 and png.shape[1] > 100
    assert read_png(out / "differences.png").shape == png.shape  # the differences against vanilla, plotted


def test_eval_defaults_to_2000_questions_and_quick_to_200():
    parser = __import__("argparse").ArgumentParser()
    evaluation.add_arguments(parser)
    assert (evaluation.DEFAULT_N, evaluation.QUICK_N) == (2000, 200)
    args = parser.parse_args([])
    assert args.n is None and not args.quick
    assert parser.parse_args(["--quick"]).quick and parser.parse_args(["--n", "7"]).n == 7


def test_infeasible_budget_is_reported_not_run(model):
    items = evaluation.synthetic_items(4)
    res = evaluation.evaluate(model, items, evaluation.prompts_for(None, model), ("fastv",), (0.1,))
    assert not res[0].feasible and res[0].accuracy() is None
    assert "n/a" in evaluation.table(res)


def test_dataset_folder_matches_the_synthetic_set(tmp_path, model):
    n = 10
    items = evaluation.synthetic_items(n)
    with (tmp_path / "questions.jsonl").open("w") as f:
        for i, it in enumerate(items):
            write_png(tmp_path / f"{i}.png", it.image)
            f.write(json.dumps({"image": f"{i}.png", "question": it.question.capitalize() + "?", "answer": it.answer,
                                "kind": it.kind, "boxes": [list(b) for b in it.boxes]}) + "\n")
    loaded = evaluation.dataset_items(tmp_path)
    prompts = evaluation.prompts_for(None, model)
    a = evaluation.evaluate(model, items, prompts, ("vanilla", "swiftvlm"), (0.25,))
    b = evaluation.evaluate(model, loaded, prompts, ("vanilla", "swiftvlm"), (0.25,))
    for x, y in zip(a, b):
        assert (x.right, x.total, x.target_kept) == (y.right, y.total, y.target_kept)


@pytest.mark.parametrize("line, words", [
    ('{"image": "../x.png", "question": "q", "answer": "a"}', "image: expected a file inside"),
    ('{"image": "0.png", "answer": "a"}', "line 1: question: expected str"),
    ('{"image": "0.png", "question": "q", "answer": "a", "boxes": [[5, 0, 1, 4]]}', "boxes: expected"),
    ('[1, 2]', "line 1: expected a JSON object"),
    ('{"image": "bad.png", "question": "q", "answer": "a"}', "expected a PNG file"),
])
def test_dataset_folder_is_validated(tmp_path, line, words):
    write_png(tmp_path / "0.png", torch.zeros(3, 8, 8, dtype=torch.uint8))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "questions.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=words):
        evaluation.dataset_items(tmp_path)
    with pytest.raises(ValueError, match="--data: expected a folder holding questions.jsonl"):
        evaluation.dataset_items(tmp_path / "nowhere")


def test_a_tokenizer_checkpoint_is_prompted_with_the_template_and_generates(tmp_path, model):
    """A checkpoint directory without vocab.json: its Hugging Face tokenizer builds the LLaVA-1.5
    prompt (the image token expanded to the model's visual tokens) and answers are generated."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    import shutil

    from transformers import PreTrainedTokenizerFast

    for name in ("config.json", "model.safetensors"):
        shutil.copy(TRAINED_DIR / name, tmp_path / name)
    vocab = {w: i for i, w in enumerate(synth.VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(tmp_path)
    loaded = evaluation.load_model(tmp_path)
    prompts = evaluation.prompts_for(tmp_path, loaded)
    assert isinstance(prompts, evaluation.TokenizerPrompts)
    unk, image = vocab["<unk>"], loaded.image_token_id
    # "USER:" and "ASSISTANT:" are unknown words to this tokenizer
    assert prompts.ids("what colour is the background", 3) == [unk, image, image, image] + \
        [vocab[w] for w in "what colour is the background".split()] + [unk]
    res = evaluation.evaluate(loaded, evaluation.synthetic_items(4), prompts, ("vanilla", "swiftvlm"), (0.5,),
                              max_new_tokens=2)
    assert [sum(r.total.values()) for r in res] == [4, 4] and res[1].tokens_per_layer == pytest.approx(71.7, abs=0.1)
