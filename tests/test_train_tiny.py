"""tools/train_tiny.py end to end on a few steps: it trains through the project's LLaVA forward, writes
an llava-hf checkpoint that LlavaForward.from_pretrained loads, and the loaded model reaches the
recorded held-out accuracy exactly (the same predictions)."""
import importlib.util
import json
from pathlib import Path

import torch

from swiftvlm_kernels.models.llava import LlavaForward

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "tools" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_save_load_reaches_the_recorded_accuracy(tmp_path):
    train = _script()
    threads = torch.get_num_threads()
    try:
        assert train.main(["--out", str(tmp_path), "--steps", "2", "--batch", "2", "--eval", "10", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    record = json.loads((tmp_path / "train.json").read_text())
    assert record["steps"] == 2 and record["held_out"]["n"] == 10
    model = LlavaForward.from_pretrained(tmp_path)
    assert model.num_visual_tokens == 144 and len(model.language_model.layers) == 12
    assert train.evaluate(model, 10) == record["held_out"]
    # trained: the decoder's weights moved away from the initial checkpoint's
    init = LlavaForward.from_config(train.trained_config())
    init.load_tensors(train.tiny_tensors(train.trained_config(), seed=0))
    assert not torch.equal(init.lm_head.weight, model.lm_head.weight)
