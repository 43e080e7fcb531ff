"""tools/train_tiny.py end to end on a few steps: it trains through the project's LLaVA forward, writes
an llava-hf checkpoint that LlavaForward.from_pretrained loads, and the loaded model reaches the
recorded held-out accuracy exactly (the same predictions)."""
import json

import torch

from swiftvlm_kernels.models.llava import LlavaForward


def test_train_save_load_reaches_the_recorded_accuracy(tmp_path, train_tiny):
    train = train_tiny
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
    assert train.evaluate(model, 10, question_first=record["question_first"]) == record["held_out"]
    assert (tmp_path / "prompt.json").is_file() and record["question_first"] is True
    # trained: the decoder's weights moved away from the initial checkpoint's
    init = LlavaForward.from_config(train.trained_config())
    init.load_tensors(train.initial_tensors(train.trained_config(), seed=0))
    assert not torch.equal(init.lm_head.weight, model.lm_head.weight)
