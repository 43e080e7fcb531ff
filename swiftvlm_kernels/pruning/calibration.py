"""Calibrating ALVTS' selectors (docs/semantics.md "ALVTS" point 3): fit each selecting layer's rank-R
query-key form (Wq~, Wk~) to the layer's real attention, the model frozen.

For layer l and a calibration sample, with x = input_layernorm_l(h) the layer's normed input in an
unpruned forward:

    S  = t2v * v2v of attention_importance(x Wq~, x Wk~, vis_start, n_vis, R ** -0.5, key_mask)
         (the selector's importance: one head, no RoPE, as the pruning engine computes it)
    S* = t2v * v2v of attention_importance(q, k, vis_start, n_vis, D ** -0.5, key_mask)
         (the layer's own queries and keys: every head, grouped-query, after RoPE)

and the fit minimises the Kullback-Leibler divergence KL(p* || p) of the two importances normalised
over each sample's visual tokens (p* = S* / sum S*, p = S / sum S), averaged over the training
samples, starting from the SVD selector of the same rank (`Selector.from_layers`, the default). The
loss is scale-free and weighs each token by its real importance: what a top-k selection needs is
that S ranks S*'s heavy tokens first, not that S matches S*'s values. (A mean squared error of S
against S* was tried first: it fitted the overall scale and lowered the selector's rank correlation
with S* at 9 of 11 layers of the embedded model, e.g. top-third mass 0.71 -> 0.50 at layer 3; the KL
form raises it there to 0.94.) The loss is differentiable through `python_ref.attention_importance`
(it materialises [B, H, L, L]: fine at the sizes calibration runs at; the kernels' backward is not
written). Adam, a fixed number of steps, minibatches drawn with a seeded generator, one layer at a
time; nothing else is random, so the same inputs, seed and thread count give the same weights bit
for bit.

Each layer's record holds, on the held-out samples, the loss before (the SVD selector) and after
calibration (in nats), the Spearman rank correlation of S with S* (per sample over its visual
tokens, ties ranked by their mean rank; the mean over samples), the share of S*'s top third of
visual tokens that S's top third holds, and the share of S*'s total that S's top third holds (what
a selection at a third of the tokens keeps of the real importance).

Works with the minimal LLaVA forward (`models.llava.LlavaForward`, read through its interface: its
decoder layers, `rope_table`, `image_token_id`, `num_visual_tokens` and forward with
`output_hidden_states`); one image per sample. Calibrating a transformers model through
`swiftvlm_kernels.hf` is not written yet: its decoder layers have the same layout, what is missing is
collecting their inputs and RoPE tables from a transformers forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

import python_ref

from .selector import Selector, svd_form

DEFAULT_STEPS = 300
DEFAULT_LR = 3e-3
DEFAULT_BATCH = 64
OBJECTIVE = ("mean over samples of KL(p* || p) in nats, p = S / sum S and p* = S* / sum S* over the sample's "
             "visual tokens; S = t2v * v2v of the selector (attention_importance of x Wq~, x Wk~, scale R^-0.5, one "
             "head, no RoPE), S* = t2v * v2v of the layer's own queries and keys (all heads, after RoPE)")
_TINY = 1e-30  # keeps log() finite where an importance underflows to 0


@dataclass
class CalibrationSet:
    """What calibration reads of N samples: per layer the normed inputs x [N, L, d] and the targets S*
    fp32 [N, n_vis]; the samples' key mask bool [N, L] and visual starts int64 [N]."""
    x: dict
    target: dict
    key_mask: Tensor
    vis_start: Tensor
    n_vis: int

    def __len__(self) -> int:
        return self.key_mask.shape[0]

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The key mask and visual starts of the samples `index`."""
        return self.key_mask[index], self.vis_start[index]


def _layer_qk(layer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's queries [B, H, L, D] and keys [B, Hkv, L, D] of its normed input x, after RoPE."""
    attn = layer.self_attn
    return attn.query(x, cos, sin).transpose(1, 2), attn.keys(x, cos, sin).transpose(1, 2)


@torch.no_grad()
def collect(model, inputs: Mapping[str, Tensor], layers: Sequence[int], chunk: int = 64) -> CalibrationSet:
    """Unpruned forwards of `model` (a LlavaForward) on `inputs` (input_ids, attention_mask, pixel_values:
    one image per sample), `chunk` samples at a time: each layer of `layers`' normed inputs and its own
    importance S* (module docstring)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    N, L = ids.shape
    mask = torch.ones(N, L, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
    if not (ids == model.image_token_id).sum(1).eq(model.num_visual_tokens).all():
        raise ValueError(f"inputs: calibration expects one image ({model.num_visual_tokens} image tokens) per sample")
    vis_start = (ids == model.image_token_id).int().argmax(1)
    positions = (mask.long().cumsum(1) - 1).clamp_min(0)
    decoder = model.language_model.layers
    xs: dict = {layer: [] for layer in layers}
    targets: dict = {layer: [] for layer in layers}
    for lo in range(0, N, chunk):
        part = slice(lo, min(N, lo + chunk))
        out = model(ids[part], inputs["pixel_values"][part], mask[part], output_hidden_states=True)
        cos, sin = model.rope_table(positions[part], out.hidden_states[0].dtype).unbind(2)
        for layer in layers:
            block = decoder[layer - 1]
            x = block.input_layernorm(out.hidden_states[layer - 1])
            q, k = _layer_qk(block, x, cos, sin)
            t2v, v2v = python_ref.attention_importance(q, k, vis_start[part], model.num_visual_tokens,
                                                       block.self_attn.head_dim ** -0.5, mask[part])
            xs[layer].append(x.float())
            targets[layer].append(t2v * v2v)
    return CalibrationSet({layer: torch.cat(v) for layer, v in xs.items()},
                          {layer: torch.cat(v) for layer, v in targets.items()}, mask, vis_start,
                          model.num_visual_tokens)


def importance(x: Tensor, wq: Tensor, wk: Tensor, vis_start: Tensor, n_vis: int, key_mask: Tensor) -> Tensor:
    """S = t2v * v2v of the selector (Wq~, Wk~ [d, R]) on normed inputs x [B, L, d], fp32 [B, n_vis];
    differentiable in wq and wk (python_ref.attention_importance)."""
    t2v, v2v = python_ref.attention_importance((x @ wq)[:, None], (x @ wk)[:, None], vis_start, n_vis,
                                               wq.shape[1] ** -0.5, key_mask)
    return t2v * v2v


def loss(S: Tensor, target: Tensor) -> Tensor:
    """The calibration loss (module docstring): the mean over rows of KL(p* || p), p and p* the rows of
    S and S* [N, n_vis] normalised to sum 1; rows of S* that sum to 0 add nothing."""
    p = target / target.sum(1, keepdim=True).clamp_min(_TINY)
    log_q = S.clamp_min(_TINY).log() - S.sum(1, keepdim=True).clamp_min(_TINY).log()
    return (p * (p.clamp_min(_TINY).log() - log_q)).sum(1).mean()


def _mean_ranks(v: Tensor) -> Tensor:
    """Ranks 0..n-1 of the entries of v [n], ties given their mean rank."""
    order = v.argsort(stable=True)
    values, counts = v[order].unique_consecutive(return_counts=True)
    ends = counts.cumsum(0)
    means = (ends - 1 + ends - counts).double() / 2  # the mean of the positions each tie occupies
    ranks = torch.empty(v.shape[0], dtype=torch.float64)
    ranks[order] = means.repeat_interleave(counts)
    return ranks


def spearman(S: Tensor, target: Tensor) -> float:
    """The mean over samples (rows) of the Spearman rank correlation of S with S* (0 for a row where
    either is constant)."""
    out = []
    for a, b in zip(S.detach().cpu(), target.cpu()):
        ra, rb = _mean_ranks(a), _mean_ranks(b)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        norm = float(ra.norm() * rb.norm())
        out.append(float((ra * rb).sum()) / norm if norm > 0 else 0.0)
    return sum(out) / len(out)


def _top(v: Tensor, k: int) -> Tensor:
    """bool [N, n]: each row's k largest entries."""
    return torch.zeros_like(v, dtype=torch.bool).scatter_(1, v.topk(k, 1).indices, True)


def top_overlap(S: Tensor, target: Tensor, k: int) -> float:
    """The share of S*'s k largest entries per row that are among S's k largest, over all rows."""
    a, b = S.detach().cpu(), target.cpu()
    return float((_top(a, k) & _top(b, k)).sum()) / (k * a.shape[0])


def top_mass(S: Tensor, target: Tensor, k: int) -> float:
    """The share of S*'s total (summed over rows) that falls on each row's k largest entries of S: how
    much of the real importance a selection of k tokens by S keeps."""
    a, b = S.detach().cpu(), target.cpu().double()
    return float((b * _top(a, k)).sum() / b.sum())


def evaluate(data: CalibrationSet, layer: int, wq: Tensor, wk: Tensor, chunk: int = 64) -> dict:
    """Loss, Spearman correlation and top-third overlap of the selector (wq, wk) against S* on `data`."""
    with torch.no_grad():
        S = torch.cat([importance(data.x[layer][i:i + chunk], wq, wk, data.vis_start[i:i + chunk], data.n_vis,
                                  data.key_mask[i:i + chunk]) for i in range(0, len(data), chunk)])
    target = data.target[layer]
    k = max(1, round(data.n_vis / 3))
    return {"loss": float(loss(S, target)), "spearman": spearman(S, target),
            "top_third_overlap": top_overlap(S, target, k), "top_third_mass": top_mass(S, target, k)}


def fit(data: CalibrationSet, layer: int, wq: Tensor, wk: Tensor, steps: int, lr: float, batch_size: int,
        generator: torch.Generator, progress=None) -> tuple[Tensor, Tensor]:
    """`steps` Adam steps from (wq, wk) on minibatches of `batch_size` samples of `data` (a fresh
    permutation from `generator` each pass over the samples); returns the fitted fp32 weights."""
    wq, wk = wq.detach().clone().requires_grad_(), wk.detach().clone().requires_grad_()
    optimiser = torch.optim.Adam([wq, wk], lr=lr)
    N = len(data)
    batch_size = min(batch_size, N)
    order, at = torch.randperm(N, generator=generator), 0
    for _ in range(steps):
        if at + batch_size > N:
            order, at = torch.randperm(N, generator=generator), 0
        index = order[at:at + batch_size]
        at += batch_size
        key_mask, vis_start = data.rows(index)
        value = loss(importance(data.x[layer][index], wq, wk, vis_start, data.n_vis, key_mask),
                     data.target[layer][index])
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(f"layer {layer}, loss {value.item():.4g}", refresh=False)
    return wq.detach(), wk.detach()


def _rounded(metrics: Mapping[str, float], when: str) -> dict:
    return {f"{name}_{when}": float(f"{value:.6g}") for name, value in metrics.items()}


def calibrate(model, train: Mapping[str, Tensor], held_out: Mapping[str, Tensor], rank: int, *,
              layers: Optional[Sequence[int]] = None, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
              batch_size: int = DEFAULT_BATCH, seed: int = 0, progress: bool = True,
              about: Optional[Mapping[str, Any]] = None) -> Selector:
    """A calibrated selector of `model` (a LlavaForward; module docstring) at rank R = `rank`, for
    `layers` (default: ALVTS' default selecting layers, 2 .. num_layers).

    train, held_out: model inputs (input_ids, attention_mask, pixel_values; one image per sample), the
    samples the fit reads and the ones it is measured on. Each layer starts from its SVD selector of
    rank R and takes `steps` Adam steps (learning rate `lr`) on minibatches of `batch_size` training
    samples drawn with a generator seeded by (seed, layer). progress: a tqdm bar on stderr. about:
    facts for the record (the data, the model).

    The returned Selector's record["calibration"] (saved in selector.json) holds the settings and,
    per layer, the held-out loss, Spearman correlation and top-third overlap before and after.
    Deterministic for the same inputs, settings and torch thread count.
    """
    decoder = model.language_model.layers
    num_layers, d = len(decoder), decoder[0].self_attn.q_proj.weight.shape[1]
    layers = tuple(range(2, num_layers + 1)) if layers is None else tuple(layers)
    if not layers or any(not 1 <= layer <= num_layers for layer in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"layers: expected increasing layers in [1, {num_layers}], got {list(layers)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
        raise ValueError(f"rank: expected an int in [1, {d}] (the hidden size), got {rank!r}")
    from tqdm import tqdm

    fit_set, test_set = collect(model, train, layers), collect(model, held_out, layers)
    weights, per_layer = {}, {}
    bar = tqdm(total=steps * len(layers), desc="calibrate", unit="step", disable=not progress, leave=False)
    try:
        for layer in layers:
            wq, wk = svd_form(decoder[layer - 1].self_attn, rank)
            before = evaluate(test_set, layer, wq, wk)
            generator = torch.Generator().manual_seed(seed * 100_003 + layer)
            wq, wk = fit(fit_set, layer, wq, wk, steps, lr, batch_size, generator, bar)
            weights[layer] = (wq, wk)
            per_layer[str(layer)] = {**_rounded(before, "before"), **_rounded(evaluate(test_set, layer, wq, wk), "after")}
    finally:
        bar.close()
    record = {"objective": OBJECTIVE, "init": "svd", "rank": rank, "layers": list(layers),
              "samples": {"train": len(fit_set), "held_out": len(test_set)}, "seed": seed, "steps": steps,
              "optimizer": "Adam", "lr": lr, "batch_size": min(batch_size, len(fit_set)),
              "threads": torch.get_num_threads(), **dict(about or {}), "per_layer": per_layer}
    return Selector(weights, record={"init": "svd+calibration", "calibration": record})


__all__ = ["calibrate", "collect", "fit", "evaluate", "importance", "loss", "spearman", "top_overlap",
           "CalibrationSet", "DEFAULT_STEPS", "DEFAULT_LR", "DEFAULT_BATCH", "OBJECTIVE"]
