"""Train a tiny LLaVA (llava-hf layout) on the synthetic VQA task of swiftvlm_kernels/apps/synth.py.

    python3 tools/train_tiny.py --out build/tiny-trained    # 1600 steps, about 20 minutes on 2 CPU cores

The shipped model (swiftvlm_kernels/apps/weights/tiny-vqa/) is this command's output with the defaults.

The model: a CLIP-style ViT (96 x 96 images, patch 8: 144 patches, hidden 96, 3 layers of which the
LLaVA forward reads the second to last), a two-layer GELU projector, and a LLaMA-style decoder of 12
layers (hidden 128, 4 query heads and 2 KV heads, head_dim 32) over a word vocabulary of
len(synth.VOCAB) + 1 tokens (the last id is the image token). It is trained through the project's
own LLaVA forward (`LlavaForward.prefill` with no pruning, then the LM head): GPT-2-style
initialisation, AdamW with a one-cycle schedule over a fixed number of steps, fixed seeds, one thread
count, deterministic algorithms, fresh samples every step (split seed 0; held-out split seed 1).

Two things make it learn in minutes on a CPU:
- Multi-turn rows: each training image carries --questions distinct questions, each followed by its
  answer word (`synth.more_questions`), and every answer is a target (cross-entropy at its question's
  last token). Evaluation asks one question, as the first turn of training does.
- Patch probes: an auxiliary loss reads each projected patch feature (what the decoder receives) with
  linear probes for its cell's object colour, shape and the cell's row and column; the probes are
  training scaffolding and are not saved.
A question ends with the word naming what to look at (synth.py): with a trailing "?" the decoder did
not learn, in the same budget, to carry the question into the last token (colour questions at 0 %
after 300 steps).

It stops after --steps, evaluates the held-out set greedily, and writes config.json, vocab.json (the
word vocabulary), model.safetensors (fp32; the tensor names of published llava-hf checkpoints, so
LlavaForward.from_pretrained and transformers load it) and train.json (settings, wall time, the loss
log, held-out accuracy overall and per question type on --eval questions, and on the first 200: the
slice the tests re-evaluate exactly).
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

from swiftvlm_kernels.apps import synth  # noqa: E402
from swiftvlm_kernels.models.llava import LlavaForward  # noqa: E402
from swiftvlm_kernels.models.tiny import hub_key, tiny_llava_config, tiny_tensors  # noqa: E402


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


def initial_tensors(config: dict, seed: int = 0) -> dict:
    """The starting checkpoint: GPT-2-style normal init (std 0.02; the residual branches' output
    projections o_proj / down_proj / out_proj / fc2 by 1 / sqrt(2 x layers)), norms 1, biases 0."""
    tensors = tiny_tensors(config, seed)
    gen = torch.Generator().manual_seed(seed)
    depth = config["text_config"]["num_hidden_layers"]
    for name in sorted(tensors):
        t = tensors[name]
        if "norm" in name and name.endswith("weight"):
            tensors[name] = torch.ones_like(t)
        elif name.endswith("bias"):
            tensors[name] = torch.zeros_like(t)
        else:
            std = 0.02 / (2 * depth) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight",
                                                               "fc2.weight")) else 0.02
            tensors[name] = std * torch.randn(t.shape, generator=gen)
    return tensors


def patch_labels(samples, grid_patches: int, cell_patches: int) -> torch.Tensor:
    """long [B, N_v, 4]: per patch, its cell's object colour (0 none), shape (0 none), row and column."""
    colours, shapes = sorted(synth.COLOURS), synth.SHAPES
    out = torch.zeros(len(samples), grid_patches, grid_patches, 4, dtype=torch.long)
    cells = torch.arange(grid_patches) // cell_patches
    out[..., 2] = cells[:, None]
    out[..., 3] = cells[None, :]
    for b, s in enumerate(samples):
        for o in s.objects:
            r, c = o.cell
            block = out[b, r * cell_patches:(r + 1) * cell_patches, c * cell_patches:(c + 1) * cell_patches]
            block[..., 0] = colours.index(o.colour) + 1
            block[..., 1] = shapes.index(o.shape) + 1
    return out.flatten(1, 2)


class Probes(torch.nn.Module):
    """Linear probes on the projected patch features (training scaffolding, not saved)."""

    def __init__(self, d: int, grid: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(d, n) for n in
                                         (len(synth.COLOURS) + 1, len(synth.SHAPES) + 1, grid, grid))

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(torch.nn.functional.cross_entropy(head(features).flatten(0, 1), labels[..., i].flatten())
                   for i, head in enumerate(self.heads)) / len(self.heads)


def conversation_batch(samples, extra: list, num_patches: int,
                       question_first: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Multi-turn training rows: <bos>, the first question (question_first), the image, then each
    question followed by its answer word;
    the model is trained to predict every answer at its question's last token. Returns the model
    inputs (left-padded), the [B, T] positions of the question ends and the [B, T] answer ids."""
    vocab = synth.VOCAB
    rows, ends, answers = [], [], []
    for s, more in zip(samples, extra):
        row = [vocab.index("<bos>")] + (synth.encode(s.question) if question_first else []) + [len(vocab)] * num_patches
        e, a = [], []
        for q, ans in [(s.question, s.answer)] + [(q, ans) for _, q, ans in more]:
            row += synth.encode(q)
            e.append(len(row) - 1)
            a.append(vocab.index(ans))
            row.append(a[-1])
        rows.append(row[:-1])  # the last answer is predicted, not read
        ends.append(e)
        answers.append(a)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), len(ends[0]), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
        pos[b] = torch.tensor(ends[b]) + width - len(r)
    inputs = synth.batch(samples, num_patches)
    inputs.update(input_ids=ids, attention_mask=mask)
    return inputs, pos, torch.tensor(answers)


def evaluate(model: LlavaForward, n: int, batch_size: int = 64, seed: int = 1, question_first: bool = True) -> dict:
    """Held-out greedy accuracy, overall and per question type."""
    right: dict = {k: 0 for k in synth.KINDS}
    total: dict = {k: 0 for k in synth.KINDS}
    with torch.no_grad():
        for start in range(0, n, batch_size):
            samples = [synth.sample(seed, i) for i in range(start, min(n, start + batch_size))]
            inputs = synth.batch(samples, model.num_visual_tokens, question_first=question_first)
            pred = answer_logits(model, inputs).argmax(-1)
            for s, ok in zip(samples, (pred == inputs["answers"]).tolist()):
                right[s.kind] += ok
                total[s.kind] += 1
    per_kind = {k: right[k] / total[k] for k in synth.KINDS if total[k]}
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())), "per_kind": per_kind, "n": n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--questions", type=int, default=6, help="questions per training image (multi-turn)")
    parser.add_argument("--question-first", action=argparse.BooleanOptionalAction, default=True,
                        help="the prompt holds the question before the image too (default: yes)")
    parser.add_argument("--aux", type=float, default=1.0, help="weight of the patch probes' loss")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval", type=int, default=1000, help="held-out samples for the recorded accuracy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=0, help="print a 200-sample held-out check every N steps")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    config = trained_config()
    tensors = initial_tensors(config, seed=0)
    model = LlavaForward.from_config(config)
    model.load_tensors(tensors)
    model.train()
    grid = synth.GRID
    cell_patches = int(model.num_visual_tokens ** 0.5) // grid
    probes = Probes(config["text_config"]["hidden_size"], grid)
    captured: list = []
    model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: captured.append(out))
    params = [p for p in model.parameters() if p.requires_grad] + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    start, step, log = time.time(), 0, []
    while step < args.steps:
        samples = [synth.sample(0, step * args.batch + i) for i in range(args.batch)]
        extra = [synth.more_questions(smp, args.questions - 1, 0, step * args.batch + i) for i, smp in enumerate(samples)]
        inputs, ends, answers = conversation_batch(samples, extra, model.num_visual_tokens, args.question_first)
        captured.clear()
        seq, _ = model.prefill(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"].bool(), None)
        h = seq.h.gather(1, ends[..., None].expand(-1, -1, seq.h.shape[-1]))
        answer = torch.nn.functional.cross_entropy(model.lm_head(h).flatten(0, 1), answers.flatten())
        aux = probes.loss(captured[0], patch_labels(samples, grid * cell_patches, cell_patches))
        loss = answer + args.aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 50 == 0 or step == 1:
            log.append({"step": step, "loss": round(answer.item(), 4), "aux": round(aux.item(), 4),
                        "seconds": round(time.time() - start, 1)})
            print(f"step {step} answer loss {answer.item():.4f} probes {aux.item():.4f} ({time.time() - start:.0f} s)",
                  flush=True)
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            print(f"  held-out {evaluate(model, 200, question_first=args.question_first)}", flush=True)
            model.train()
    wall = time.time() - start
    model.eval()
    result = evaluate(model, args.eval, question_first=args.question_first)
    check = evaluate(model, min(args.eval, 200), question_first=args.question_first)  # a slice the tests re-evaluate exactly
    for name, p in model.named_parameters():  # trained values over the initial checkpoint's
        tensors[hub_key(name)] = p.detach().clone().contiguous()
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    (args.out / "vocab.json").write_text(json.dumps(list(synth.VOCAB)))
    (args.out / "prompt.json").write_text(json.dumps({"question_first": args.question_first}))
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    record = {"steps": step, "batch": args.batch, "lr": args.lr, "aux": args.aux, "questions": args.questions,
              "question_first": args.question_first, "wall_seconds": round(wall, 1),
              "threads": args.threads, "held_out": result, "slice": check, "log": log}
    (args.out / "train.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "log"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
