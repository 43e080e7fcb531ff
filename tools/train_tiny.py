"""Train a tiny LLaVA (llava-hf layout) on the synthetic VQA task of swiftvlm_kernels/synth.py.

    python3 tools/train_tiny.py --out build/tiny-trained [--steps 3000] [--minutes 18]

The model: a CLIP-style ViT (96 x 96 images, patch 8: 144 patches, hidden 96, 3 layers of which the
LLaVA forward reads the second to last), a two-layer GELU projector, and a LLaMA-style decoder of 12
layers (hidden 128, 4 query heads and 2 KV heads, head_dim 32) over a word vocabulary of
len(synth.VOCAB) + 1 tokens (the last id is the image token). It is trained through the project's
own LLaVA forward (`LlavaForward.prefill` with no pruning, then the LM head at the last position):
cross-entropy on the one-token answer, AdamW, fixed seeds, one thread count, deterministic algorithms,
fresh samples every step (split seed 0; held-out split seed 1). It stops after --steps or --minutes,
whichever comes first, evaluates the held-out set greedily, and writes config.json,
model.safetensors (fp32; the same tensor names as published llava-hf checkpoints, so
LlavaForward.from_pretrained and transformers load it) and train.json (steps, wall time, held-out
accuracy overall and per question type).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swiftvlm_kernels import synth  # noqa: E402
from swiftvlm_kernels.models.llava import LlavaForward  # noqa: E402
from swiftvlm_kernels.models.tiny import _hub_key, tiny_llava_config, tiny_tensors  # noqa: E402


def trained_config() -> dict:
    """config.json of the trained tiny model (llava-hf format)."""
    config = tiny_llava_config()
    vocab = len(synth.VOCAB) + 1
    config["image_token_index"] = vocab - 1
    config["vision_config"].update(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                                   image_size=96, patch_size=8, projection_dim=96)
    config["text_config"].update(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=12,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 bos_token_id=synth.VOCAB.index("<bos>"), eos_token_id=synth.VOCAB.index("<eos>"),
                                 pad_token_id=synth.VOCAB.index("<pad>"))
    return config


def answer_logits(model: LlavaForward, inputs: dict) -> torch.Tensor:
    """[B, vocab] logits of the next token after each prompt (differentiable: no torch.no_grad)."""
    seq, _ = model.prefill(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"].bool(), None)
    return model.lm_head(seq.h[:, -1])


def evaluate(model: LlavaForward, n: int, batch_size: int = 64, seed: int = 1) -> dict:
    """Held-out greedy accuracy, overall and per question type."""
    right: dict = {k: 0 for k in synth.KINDS}
    total: dict = {k: 0 for k in synth.KINDS}
    with torch.no_grad():
        for start in range(0, n, batch_size):
            samples = [synth.sample(seed, i) for i in range(start, min(n, start + batch_size))]
            inputs = synth.batch(samples, model.num_visual_tokens)
            pred = answer_logits(model, inputs).argmax(-1)
            for s, ok in zip(samples, (pred == inputs["answers"]).tolist()):
                right[s.kind] += ok
                total[s.kind] += 1
    per_kind = {k: right[k] / total[k] for k in synth.KINDS if total[k]}
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())), "per_kind": per_kind, "n": n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=18.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval", type=int, default=1000, help="held-out samples for the recorded accuracy")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    config = trained_config()
    tensors = tiny_tensors(config, seed=0)
    model = LlavaForward.from_config(config)
    model.load_tensors(tensors)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    start, step, log = time.time(), 0, []
    while step < args.steps and time.time() - start < args.minutes * 60:
        samples = [synth.sample(0, step * args.batch + i) for i in range(args.batch)]
        inputs = synth.batch(samples, model.num_visual_tokens)
        loss = torch.nn.functional.cross_entropy(answer_logits(model, inputs), inputs["answers"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 50 == 0 or step == 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1)})
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    wall = time.time() - start
    model.eval()
    result = evaluate(model, args.eval)
    for name, p in model.named_parameters():  # trained values over the initial checkpoint's
        tensors[_hub_key(name)] = p.detach().clone().contiguous()
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    record = {"steps": step, "batch": args.batch, "lr": args.lr, "wall_seconds": round(wall, 1),
              "threads": args.threads, "held_out": result, "log": log}
    (args.out / "train.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "log"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
