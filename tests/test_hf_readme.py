"""The README's "Use it with transformers" example runs as written (on a tiny random model), taken
from README.md; and apply_on_load."""
import os
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from swiftvlm_kernels import hf  # noqa: E402
from swiftvlm_kernels.models.tiny import save_tiny_llava  # noqa: E402
from swiftvlm_kernels.pruning import FastV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    at = text.find("## Use it with transformers")
    assert at >= 0, "README.md: no 'Use it with transformers' section"
    block = re.search(r"```python\n(.*?)```", text[at:], re.S)
    assert block, "README.md: the 'Use it with transformers' section has no python block"
    return block.group(1)


def test_readme_example_runs(tmp_path, capsys):
    code = readme_example()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope = {}
        exec(compile(code, "README example", "exec"), scope)
    finally:
        os.chdir(cwd)
    model, ids = scope["model"], scope["ids"]
    assert not hf.is_applied(model)
    assert ids.shape == (2, scope["inputs"]["input_ids"].shape[1] + 8)
    lengths = capsys.readouterr().out
    assert "48" in lengths


def test_apply_on_load(tmp_path):
    path = save_tiny_llava(tmp_path / "tiny")
    with hf.apply_on_load(FastV(layer=2, budget_ratio=0.5), backend="cpu"):
        model = transformers.LlavaForConditionalGeneration.from_pretrained(path)
        auto = transformers.AutoModelForImageTextToText.from_pretrained(path)
    assert hf.is_applied(model) and hf.is_applied(auto)
    assert not hf.is_applied(transformers.LlavaForConditionalGeneration.from_pretrained(path))
    assert "from_pretrained" not in transformers.LlavaForConditionalGeneration.__dict__
    with pytest.raises(ValueError, match="pruning"):
        with hf.apply_on_load(None):
            pass
