"""bench/hf_eval.py: evaluate a transformers checkpoint directory on a local dataset folder (token
form: no processor needed), unpruned and pruned; untrusted dataset files are refused clearly."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bench import hf_eval  # noqa: E402
from swiftvlm_kernels.models.tiny import save_tiny_llava, tiny_inputs  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny LLaVA checkpoint and a 3-sample dataset whose answers are the unpruned greedy ids."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hf_eval")
    ckpt = save_tiny_llava(root / "ckpt")
    data = root / "data"
    data.mkdir()
    model = transformers.LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    lines = []
    for i in range(3):
        inputs = tiny_inputs(1, seed=i)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        save_file({"pixel_values": inputs["pixel_values"]}, str(data / f"s{i}.safetensors"))
        lines.append({"input_ids": inputs["input_ids"][0].tolist(), "tensors": f"s{i}.safetensors",
                      "answer_ids": out[0, -2:].tolist()})
    (data / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return ckpt, data


def test_evaluate_token_form(toy, tmp_path):
    ckpt, data = toy
    out = tmp_path / "result.json"
    assert hf_eval.main([str(ckpt), str(data), "--methods", "none,swiftvlm,fastv,pdrop", "--budget-ratio", "0.4",
                         "--max-new-tokens", "2", "--batch-size", "2", "--backend", "cpu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())["methods"]
    assert result["none"]["accuracy"] == 1.0 and result["none"]["n"] == 3
    for name in ("swiftvlm", "fastv", "pdrop"):
        assert 0.0 <= result[name]["accuracy"] <= 1.0 and "agreement_with_first" in result[name]
        assert result[name]["mean_rows_per_layer"] < 48  # pruned: fewer rows than the 48-token prompt
    keep_all = hf_eval.evaluate(ckpt, data, ["none", "swiftvlm"], budget_ratio=1.0, max_new_tokens=2, backend="cpu")
    assert keep_all["methods"]["swiftvlm"]["agreement_with_first"] == 1.0


def test_dataset_is_validated(toy, tmp_path):
    _, data = toy
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.jsonl").write_text(json.dumps({"input_ids": [1, 2], "tensors": "../outside.safetensors",
                                                "answer_ids": [3]}) + "\n")
    with pytest.raises(ValueError, match="line 1: tensors: expected a file inside"):
        hf_eval.read_dataset(bad)
    (bad / "x.safetensors").write_bytes(b"not a safetensors file")
    (bad / "data.jsonl").write_text(json.dumps({"input_ids": [1, 2], "tensors": "x.safetensors",
                                                "answer_ids": [3]}) + "\n")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        hf_eval.read_dataset(bad)
    (bad / "data.jsonl").write_text(json.dumps({"input_ids": [1, -2], "tensors": "x.safetensors", "answer_ids": [3]}))
    with pytest.raises(ValueError, match="input_ids: expected a non-empty list"):
        hf_eval.read_dataset(bad)
    (bad / "data.jsonl").write_text(json.dumps({"image": "a.png", "question": 3, "answer": "x"}))
    with pytest.raises(ValueError, match="question: expected a string"):
        hf_eval.read_dataset(bad)


def test_dataset_lines_are_read_as_utf8_naming_the_line(tmp_path):
    """Invalid UTF-8 (a bare UnicodeDecodeError before) and a JSON line holding U+2028, which
    str.splitlines() used to cut in two."""
    (tmp_path / "data.jsonl").write_bytes(b'{"image": "a.png", "question": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(ValueError, match="data.jsonl line 1: expected UTF-8 text"):
        hf_eval.read_dataset(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "a.png", "question": "a\u2028b", "answer": "x"},
                                                    ensure_ascii=False) + "\n", encoding="utf-8")
    assert hf_eval.read_dataset(tmp_path)[0]["question"] == "a\u2028b"
