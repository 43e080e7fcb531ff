"""Crafted inputs against `eval`'s dataset and model folders and the PNG reader: each gives the right
answer or a ValueError naming the option, or the file and line, and none asks for memory or time
out of proportion to what it holds."""
import gc
import json
import os
import struct
import subprocess
import sys
import weakref
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from swiftvlm_kernels.apps import evaluation, png, synth
from swiftvlm_kernels.apps.cli import main as cli_main
from swiftvlm_kernels.apps.evaluation import data
from swiftvlm_kernels.apps.png import MAX_SIDE, SIGNATURE, _chunk, decode_png, png_size, read_png, write_png
from swiftvlm_kernels.apps.trained import trained_tiny_llava

ROOT = Path(__file__).resolve().parents[1]
GOOD = '{"image": "a.png", "question": "what colour is the object", "answer": "red", "kind": "colour"}'


@pytest.fixture(scope="module")
def model():
    m = trained_tiny_llava()
    m.eval()
    return m


def _png(w, h, colour=2, channels=3, filter_type=0, level=6) -> bytes:
    """A PNG of w x h black pixels, every row filtered with filter_type (its bytes stay 0)."""
    rows = (bytes([filter_type]) + bytes(w * channels)) * h
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows, level)) + _chunk(b"IEND", b"")


def _folder(root, *lines, images=("a.png",)):
    """A dataset folder: 8 x 8 PNGs and questions.jsonl of the lines (str or bytes)."""
    for name in images:
        write_png(root / name, torch.zeros(3, 8, 8, dtype=torch.uint8))
    (root / "questions.jsonl").write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n"
                                                    for x in lines))
    return root


def _refused(root, words):
    with pytest.raises(ValueError, match=words):
        evaluation.dataset_items(root)


# -- 1. a side longer than MAX_SIDE; the resize of the largest accepted image --------------------------

@pytest.mark.parametrize("w, h", [(1, 16_777_216), (16_777_216, 1)])
def test_a_side_longer_than_max_side_is_refused_from_the_header(tmp_path, monkeypatch, w, h):
    """1 x 16,777,216 pixels pass the total-pixel limit; its 32 KB PNG made the resize ask for 19 GB."""
    path = tmp_path / "a.png"
    path.write_bytes(_png(w, h, colour=0, channels=1))
    assert path.stat().st_size < 70_000

    def no_inflating():
        raise AssertionError("inflated")

    monkeypatch.setattr(zlib, "decompressobj", no_inflating)
    for read in (read_png, png_size):
        with pytest.raises(ValueError, match=f"a.png: expected 1 to 16777216 pixels and at most {MAX_SIDE} a side, "
                                             f"got {w} x {h}"):
            read(path)
    _folder(tmp_path, GOOD.replace("a.png", "b.png"), GOOD, images=("b.png",))
    _refused(tmp_path, "questions.jsonl line 2: image: .*a.png: expected 1 to 16777216 pixels and at most")


def test_decoding_and_resizing_the_largest_accepted_images_stay_under_the_stated_bounds(tmp_path):
    """The evaluation's --help: decoding the largest accepted image takes under 200 MiB, decoding and
    resizing it under 280 MiB (1024 x 16384 RGBA, the longest side and the most pixels, resized to
    336 px: the largest intermediate)."""
    path = tmp_path / "tall.png"
    path.write_bytes(_png(1024, 16384, colour=6, channels=4, filter_type=4))
    script = """if True:
        import resource, sys
        from collections import OrderedDict
        from pathlib import Path
        import torch
        torch.set_num_threads(1)
        from swiftvlm_kernels.apps.evaluation.data import ImageFile
        from swiftvlm_kernels.apps.png import png_size, read_png
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        path, base = Path(sys.argv[1]), peak()
        image = read_png(path)
        decoded = peak() - base
        del image
        ImageFile(path, (3, *png_size(path)), "t", OrderedDict()).resized(336)
        print(decoded, peak() - base)"""
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    decoded, resized = (int(v) for v in run.stdout.split())
    assert decoded < 200 * 2**20 and resized < 280 * 2**20, (decoded / 2**20, resized / 2**20)


# -- 2. images read lazily, one at a time, through a bounded cache ---------------------------------------

def test_dataset_images_are_read_when_their_batch_runs_one_at_a_time(tmp_path, model, monkeypatch):
    """One 4096 x 4096 PNG (about 50 KB) named by 120 lines is decoded once, when its first batch runs,
    not 120 times up front; no decoded image outlives its resize."""
    (tmp_path / "big.png").write_bytes(_png(4096, 4096))
    lines = [GOOD.replace("a.png", "big.png")] * 120 + [GOOD]
    _folder(tmp_path, *lines)
    reads, alive = [], []
    real = data.read_png

    def counting(path):
        gc.collect()
        assert not any(r() is not None for r in alive), "a decoded image is still held"
        image = real(path)
        reads.append(path.name)
        alive.append(weakref.ref(image))
        return image

    monkeypatch.setattr(data, "read_png", counting)
    items = evaluation.dataset_items(tmp_path)
    assert not reads and len({id(it.image) for it in items}) == 2  # headers only; one ImageFile per file
    (res,) = evaluation.evaluate(model, items, evaluation.prompts_for(None, model), ("vanilla",), batch_size=50)
    assert reads == ["big.png", "a.png"] and sum(res.total.values()) == 121


def test_the_resized_images_cache_is_bounded(tmp_path, model, monkeypatch):
    _folder(tmp_path, *(GOOD.replace("a.png", f"{n}.png") for n in "abca"), images=("a.png", "b.png", "c.png"))
    reads = []
    real = data.read_png
    monkeypatch.setattr(data, "read_png", lambda path: reads.append(path.name) or real(path))
    monkeypatch.setattr(data, "CACHED_IMAGES", 2)
    items = evaluation.dataset_items(tmp_path)
    evaluation.batch_inputs(items, evaluation.prompts_for(None, model), model)
    assert reads == ["a.png", "b.png", "c.png", "a.png"]  # a was the least recently used when c came


def test_help_states_the_memory_bound(capsys):
    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "at most one decoded image, 64 resized ones and one batch of inputs" in text


# -- 3. the row unfilter with numpy (bit-exactness: tests/test_png.py) ----------------------------------

def test_a_paeth_filtered_4096_square_decodes():
    """The 74 KB Paeth-filtered 4096 x 4096 RGBA file that took the pure-Python unfilter 15.7 s decodes
    right (its speed is a benchmark, not a test: python -m bench.png)."""
    blob = _png(4096, 4096, colour=6, channels=4, filter_type=4, level=9)
    assert len(blob) < 80_000
    image = decode_png(blob)
    assert image.shape == (3, 4096, 4096) and not image.any()


# -- 4. the signature and header before the body; the file's length bounded by its header -------------

def test_a_huge_file_is_refused_before_its_body_is_read(tmp_path):
    """6 GiB (sparse) files: read whole, they ended in a bare MemoryError."""
    not_png, too_long = tmp_path / "x.png", tmp_path / "y.png"
    for path, head in ((not_png, b"GIF89a" + bytes(100)), (too_long, _png(2, 2))):
        with path.open("wb") as f:
            f.write(head)
            f.truncate(6 << 30)
    for read in (read_png, png_size):
        with pytest.raises(ValueError, match=r"x.png: expected a PNG file \(its signature\), got b'GIF89a"):
            read(not_png)
        with pytest.raises(ValueError, match="y.png: expected at most 16777244 bytes for a 2 x 2 image "
                                             r"\(twice its filtered rows plus 16 MiB\)"):
            read(too_long)
    with pytest.raises(ValueError, match="expected at most 16777244 bytes"):
        decode_png(_png(2, 2) + bytes(16 << 20))


def test_the_chunks_are_bounded_in_number(monkeypatch):
    """Empty chunks cost no bytes of image but a step each: at most MAX_CHUNKS (2**20, about a
    second) are walked."""
    monkeypatch.setattr(png, "MAX_CHUNKS", 8)
    blob = _png(2, 2)
    decode_png(blob[:33] + _chunk(b"tEXt", b"") * 6 + blob[33:])  # and IDAT, IEND: 8
    with pytest.raises(ValueError, match="expected at most 8 chunks"):
        decode_png(blob[:33] + _chunk(b"tEXt", b"") * 7 + blob[33:])


def test_the_header_must_come_first(tmp_path):
    blob = _png(2, 2)
    text = _chunk(b"tEXt", b"a\0b")
    with pytest.raises(ValueError, match="expected the IHDR chunk first, got b'tEXt'"):
        decode_png(SIGNATURE + text + blob[8:])
    with pytest.raises(ValueError, match="expected one IHDR chunk, got a second"):
        decode_png(blob[:33] + blob[8:])


# -- 5. question length; the prompt against the model's context -----------------------------------------

@pytest.mark.parametrize("question, words", [
    ("w " * 200_000, "question: expected at most 16384 characters, got 400000"),
    ("w " * 5_000, "question: expected at most 4096 words, got 5000"),
])
def test_overlong_questions_are_refused_when_read(tmp_path, question, words):
    _folder(tmp_path, GOOD, json.dumps({"image": "a.png", "question": question, "answer": "red"}))
    _refused(tmp_path, f"questions.jsonl line 2: {words}")


def test_a_prompt_longer_than_the_models_context_is_refused_naming_the_line(tmp_path, model, capsys):
    """200 words: <bos>, the words, 144 image tokens and the words again are 545 > 512 positions."""
    _folder(tmp_path, GOOD, json.dumps({"image": "a.png", "question": "what " * 200, "answer": "red"}))
    items = evaluation.dataset_items(tmp_path)
    with pytest.raises(ValueError, match="questions.jsonl line 2: question: expected a prompt of at most "
                                         "max_position_embeddings = 512 tokens .*, got 545 prompt tokens"):
        evaluation.evaluate(model, items, evaluation.prompts_for(None, model), ("vanilla",))
    assert cli_main(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "line 2: question: expected a prompt of at most" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_generating_model_counts_its_new_tokens_against_the_context():
    item = data.Item(torch.zeros(3, 8, 8, dtype=torch.uint8), "q", "a", source="d/questions.jsonl line 7")
    fake = SimpleNamespace(num_visual_tokens=3, image_token_id=9, text_config=SimpleNamespace(max_position_embeddings=8))
    prompts = SimpleNamespace(ids=lambda question, n: [1] + [9] * n + [2])
    assert evaluation.prompt_ids(item, prompts, fake, 3) == [1, 9, 9, 9, 2]
    with pytest.raises(ValueError, match="d/questions.jsonl line 7: question: expected a prompt and --max-new-tokens "
                                         "4 of at most max_position_embeddings = 8 tokens"):
        evaluation.prompt_ids(item, prompts, fake, 4)


# -- 6. --layers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [("fastv=2:4", "expected one layer for fastv"),
                                         ("swiftvlm=4:2", "expected increasing layers >= 1"),
                                         ("pdrop=0:3", "expected increasing layers >= 1"),
                                         ("swiftvlm=2,swiftvlm=3", "expected each method once")])
def test_malformed_layers_are_usage_errors(spec, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["eval", "--layers", spec])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"argument --layers: {words}" in err


def test_layers_beyond_the_model_fail_before_anything_runs(tmp_path, model, capsys):
    """Before: a table of n/a and exit 0. Now exit 1 naming --layers, before --data is even read."""
    assert cli_main(["eval", "--layers", "fastv=12", "--data", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --layers fastv=12: expected layers that fit the model's 12 layers" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="layers pdrop=2:6:13: expected layers that fit"):
        evaluation.evaluate(model, evaluation.synthetic_items(2), evaluation.prompts_for(None, model), ("pdrop",),
                            layers={"pdrop": (2, 6, 13)})


# -- 7. the kind "all" ------------------------------------------------------------------------------------

def test_the_overall_columns_name_is_refused_as_a_kind(tmp_path):
    _folder(tmp_path, GOOD, GOOD.replace('"colour"', '"all"'))
    _refused(tmp_path, "questions.jsonl line 2: kind: 'all' is the overall accuracy's name")


def test_questions_without_a_kind_count_in_the_overall_only(tmp_path, model):
    _folder(tmp_path, GOOD, GOOD.replace(', "kind": "colour"', ""), GOOD)
    items = evaluation.dataset_items(tmp_path)
    results = evaluation.evaluate(model, items, evaluation.prompts_for(None, model), ("vanilla",))
    evaluation.write_outputs(results, tmp_path / "out", {}, "t")
    rows = list(__import__("csv").DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(r["kind"], r["total"]) for r in rows] == [("all", "3"), ("colour", "2")]
    assert evaluation.table(results).splitlines()[0].split().count("all") == 1


# -- 8. boxes outside the image ----------------------------------------------------------------------------

@pytest.mark.parametrize("box", [[0, 0, 9, 8], [0, 7, 8, 9], [8, 8, 100, 100]])
def test_boxes_outside_the_image_are_refused(tmp_path, box):
    _folder(tmp_path, GOOD, GOOD[:-1] + f', "boxes": [[0, 0, 8, 8], {box}]}}')
    _refused(tmp_path, r"questions.jsonl line 2: boxes\[1\]: expected a box inside the 8 x 8 image")


# -- 9. the word vocabulary's special words ------------------------------------------------------------------

@pytest.mark.parametrize("word", ["<bos>", "<unk>"])
def test_a_vocabulary_without_a_special_word_is_refused(tmp_path, model, word):
    (tmp_path / "vocab.json").write_text(json.dumps([w for w in synth.VOCAB if w != word]))
    with pytest.raises(ValueError, match=f"{tmp_path}/vocab.json: expected the words <bos> and <unk> .*missing "
                                         f"{word}"):
        evaluation.prompts_for(tmp_path, model)
    with pytest.raises(ValueError, match=f"vocab: expected the words <bos> and <unk>, missing {word}"):
        evaluation.WordPrompts([w for w in synth.VOCAB if w != word], model.image_token_id)


# -- 10. malformed lines, paths and checkpoint files ------------------------------------------------------------

@pytest.mark.parametrize("line, words", [
    (b'{"image": "a.png", "question": "caf\xe9", "answer": "a"}', r"expected UTF-8 text, got the byte b'\\xe9' at "
                                                                   "column 36"),
    ('{"image": "a.png", "question": "q", "answer": "a", "boxes": [[1' + "0" * 5000 + ", 0, 1, 1]]}",
     r"(expected a JSON object \(Exceeds the limit|boxes)"),  # Python < 3.11 converts any integer
    ('{"image": "a.png", "question": "q", "answer": "a", "boxes": ' + "[" * 100_000 + "]" * 100_000 + "}",
     r"expected a JSON object \(nested too deeply\)"),
    (b'{"image": "a.png", "question": "q\x00", "answer": "a"}', r"expected a JSON object \(Invalid control "
                                                               "character at column 34"),
    ('{"image": "a.png\\u0000", "question": "q", "answer": "a"}', "image: expected text without NUL characters"),
    ('{"image": "a.png", "question": "q\\u0000", "answer": "a"}', "question: expected text without NUL characters"),
    ('{"image": "loop.png", "question": "q", "answer": "a"}', "image: expected a file inside"),
    ('{"image": "a.png", "question": "' + "x" * (1 << 20) + '", "answer": "a"}', "expected at most 1048576 bytes a "
                                                                               "line"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, line, words):
    os.symlink("loop.png", tmp_path / "loop.png")
    _folder(tmp_path, GOOD, line)
    _refused(tmp_path, f"questions.jsonl line 2: {words}")


@pytest.mark.parametrize("name, text, words", [
    ("vocab.json", b'["<pad>", "<bos>",', r"expected JSON \(Expecting value at line 1 column 19\)"),
    ("vocab.json", b'["<pad>",\n "<bos>" "<unk>"]', r"expected JSON \(Expecting ',' delimiter at line 2 column 10\)"),
    ("vocab.json", b'{"words": ["<bos>"]}', "expected a JSON list of distinct non-empty strings"),
    ("vocab.json", b'["<pad>",\n "\xff"]', r"expected UTF-8 text, got the byte b'\\xff' at line 2 column 3"),
    ("vocab.json", b"[" * 100_000, r"expected JSON \(nested too deeply\)"),
    ("prompt.json", b'{"question_first": tru}', r"expected JSON \(Expecting value at line 1 column 20\)"),
    ("prompt.json", b'{"question_first": "yes"}', "expected a JSON object with a bool question_first"),
])
def test_malformed_checkpoint_files_name_the_file_and_line(tmp_path, model, name, text, words):
    (tmp_path / "vocab.json").write_text(json.dumps(synth.VOCAB))
    (tmp_path / name).write_bytes(text)
    with pytest.raises(ValueError, match=f"{tmp_path}/{name}: {words}"):
        evaluation.prompts_for(tmp_path, model)


# -- 11. the image placeholder in a question ------------------------------------------------------------------

def test_the_image_placeholder_in_a_question_is_refused(tmp_path):
    _folder(tmp_path, GOOD, GOOD.replace("what colour", "<image> what colour"))
    _refused(tmp_path, "questions.jsonl line 2: question: expected no <image>")


def test_a_question_word_that_is_the_image_token_is_refused():
    """A vocabulary whose word has the image token's id: the word would open a second image span."""
    prompts = evaluation.WordPrompts(("<pad>", "<bos>", "<unk>", "what", "img"), image_token_id=4)
    fake = SimpleNamespace(num_visual_tokens=3, image_token_id=4, text_config=SimpleNamespace(max_position_embeddings=64))
    item = data.Item(torch.zeros(3, 8, 8, dtype=torch.uint8), "what img", "a", source="d/questions.jsonl line 3")
    with pytest.raises(ValueError, match="d/questions.jsonl line 3: question: expected no image token"):
        evaluation.prompt_ids(item, prompts, fake)


# -- 12. text that cannot be written --------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["kind", "question", "answer"])
def test_a_lone_surrogate_is_refused_when_the_dataset_is_read(tmp_path, field):
    """A kind of "\\ud800" failed only when results.csv was written, after the whole evaluation."""
    entry = dict(json.loads(GOOD), **{field: "x\ud800"})
    _folder(tmp_path, GOOD, json.dumps(entry))
    _refused(tmp_path, f"questions.jsonl line 2: {field}: expected valid Unicode text, got a lone surrogate U\\+D800")
