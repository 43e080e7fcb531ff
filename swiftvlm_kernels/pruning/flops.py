"""Prefill FLOPs of the language model under a pruning plan (paper Sec. 3.5, Eq. 17-19).

Units: FLOPs, a multiply-add counted as 2. Eq. 17 as printed counts each multiply-add ONCE
(Q/K/V/O projections 4 n d^2, scores and weighted values 2 n^2 d, gated MLP 3 n d m are the
multiply-add counts), while Eq. 19 counts 2 per multiply-add (the d x d query projection of one
token is written 2 d^2). This module counts both in FLOPs, so a layer costs 2 x Eq. 17.
`PrefillFlops.paper_units` reproduces the paper's own convention (Eq. 17 as printed + Eq. 19),
the unit of Table 1: vanilla LLaVA-1.5-7B with 576 visual and 70 text tokens gives 4.29e12 there.
Like the paper, the count assumes multi-head attention (K/V projections d x d) and leaves out
norms, RoPE, softmax, the embedding and the LM head.

Per layer l (Eq. 17-18 with the real token counts): n_l = n_text + the plan's visual tokens at l
(`PruningPlan.visual_tokens_per_layer`).

Pruning overhead per stage (Eq. 19, terms by stage), with R_s = n_vis - k_s rest tokens, Z_s
merged tokens, d the hidden size:

  term (Eq. 19)                      | SwiftVLM stage 1 | SwiftVLM stage s >= 2 | drop-only stage
  merge 2 R_s Z_s d (Eq. 10)         | yes (0 if Z = 0) | yes (0 if Z = 0)      | no (Z = 0)
  alignment R_{s-1} d (Eq. 13)       | no               | yes                   | no
  last-token query 2 d^2             | no               | yes                   | no
  key projection 2 (n_vis - k_s) d^2 | no               | yes                   | no
  score dot products 2 n_keys d      | yes              | yes                   | yes

- Stage 1 and drop-only stages score with the query and keys that layer x computes anyway (it runs
  on every current token), so only the score dot products are extra (recomputed outside the
  attention kernel, cf. Sec. 4.2).
- A SwiftVLM stage s >= 2 scores before layer y: the last token's query is projected separately,
  and the keys of the n_vis - k_s tokens that layer y will not run on are extra ((1 - r) n_v in
  Eq. 19); the k_s kept tokens' keys are layer y's own.

Beyond Eq. 19 (`PrefillFlops.recompute`, in `total`, not in `paper_units`): when a SwiftVLM stage
s >= 2 also merges, layer y's merged rows carry group means that the scoring pass never saw, so
the layer computes its keys afresh (models/llava.py, hf/): the n_text + k_s kept rows' keys,
2 (n_text + k_s) d^2, are computed twice (0.2 % of the pruned prefill at LLaVA-1.5-7B, budget 128).
- n_keys: the score softmax runs over every key (docs/semantics.md, tv_score): n_text + n_vis at SwiftVLM
  stages (all visual tokens are present again), n_text + the current visual tokens at drop-only
  stages. Eq. 19 writes 2 n_v d, counting the visual keys only.

ALVTS (docs/semantics.md "ALVTS"): layer l runs on n_text + k_l tokens at a selecting layer and on
all n = n_text + n_vis elsewhere (Eq. 17-18 with those counts). Its stages replace Eq. 19 with the
selector's own cost, on all n rows of the layer's input, R the selector's rank (the method's rank or
selector, else min(128, d)):

  selector projections q~ = x Wq~, k~ = x Wk~       2 x 2 d R per token:  4 n d R
  attention_importance (two passes: each row's     2 x n (n + 1) / 2 causal logits of
    log-sum-exp, then the column sums)              2 R FLOPs each:       2 n (n + 1) R

The input norm the selector reads is the layer's own (norms are left out, as in the paper), and the
product t2v * v2v and the top-k are O(n_vis) (left out, as the score top-k is).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .plan import PruningPlan, as_int


@dataclass(frozen=True)
class PrefillFlops:
    """FLOPs (multiply-add = 2) of one prefill: total = sum(per_layer) + overhead + recompute."""

    total: int
    per_layer: tuple[int, ...]  # 2 x Eq. 17 for each decoder layer, layer 1 first
    overhead: int  # Eq. 19 summed over the stages
    recompute: int = 0  # beyond Eq. 19: keys computed again after a merge (module docstring)

    @property
    def paper_units(self) -> int:
        """The paper's convention (Table 1): Eq. 17 once per multiply-add, plus Eq. 19."""
        return sum(self.per_layer) // 2 + self.overhead


def layer_flops(n: int, d: int, m: int) -> int:
    """FLOPs of one decoder layer on n tokens: 2 x C_n of Eq. 17, C_n = 4nd^2 + 2n^2d + 3ndm."""
    return 2 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)


def _config_int(text_config, name: str) -> int:
    if isinstance(text_config, Mapping):
        value = text_config.get(name)
    else:
        value = getattr(text_config, name, None)
    if value is None:
        raise ValueError(f"text_config: expected a field {name!r}, got {text_config!r}")
    return as_int(value, f"text_config.{name}", 1)


def selector_flops(n: int, d: int, rank: int) -> int:
    """FLOPs of one ALVTS stage on n rows: the selector's projections and attention_importance's two
    passes (module docstring)."""
    return 4 * n * d * rank + 2 * n * (n + 1) * rank


def _selector_rank(pruning, d: int) -> int:
    """The rank an ALVTS run's selector has: the given selector's, else min(rank or 128, d)."""
    selector = getattr(pruning, "selector", None)
    if selector is not None:
        return as_int(selector.rank, "pruning.selector.rank", 1)
    rank = getattr(pruning, "rank", None)
    return min(128 if rank is None else rank, d)


def _stage_overhead(plan: PruningPlan, s: int, n_text: int, d: int, rank: int) -> int:
    """Eq. 19 terms of stage s (0-based), as in the module docstring's table (ALVTS: its selector)."""
    if plan.layer_only(s):
        return selector_flops(n_text + plan.n_vis, d, rank)
    stage = plan.stages[s]
    rest = plan.n_vis - stage.keep
    if plan.bypass:
        n_keys = n_text + plan.n_vis
    else:
        n_keys = n_text + plan.visual_tokens_per_layer()[stage.layer - 1]
    flops = 2 * rest * stage.merge * d + 2 * n_keys * d  # merge (Eq. 10) + score dot products
    if plan.acts_before(s):
        bypassed = plan.n_vis - plan.stages[s - 1].keep
        flops += bypassed * d + 2 * d * d + 2 * rest * d * d  # alignment, query, extra keys
    return flops


def _stage_recompute(plan: PruningPlan, s: int, n_text: int, d: int) -> int:
    """FLOPs beyond Eq. 19 of stage s: the kept rows' keys computed again by a layer whose stage
    (acting before it) merged, as in the module docstring."""
    stage = plan.stages[s]
    return 2 * (n_text + stage.keep) * d * d if plan.acts_before(s) and stage.merge else 0


def prefill_flops(text_config, n_text: int, n_vis: int, pruning=None) -> PrefillFlops:
    """Prefill FLOPs (Eq. 17-19) of the language model on n_text text and n_vis visual tokens.

    text_config: a mapping or an object with hidden_size, intermediate_size, num_hidden_layers
    (an HF LlamaConfig, for instance). pruning: None (vanilla), a pruning object with
    .plan(n_vis, num_layers) (SwiftVLM, FastV, PDrop, ALVTS), or a PruningPlan for these n_vis and
    layers (an ALVTS plan: its selector's rank taken as min(128, d)).
    """
    d = _config_int(text_config, "hidden_size")
    m = _config_int(text_config, "intermediate_size")
    num_layers = _config_int(text_config, "num_hidden_layers")
    n_text = as_int(n_text, "n_text", 0)
    n_vis = as_int(n_vis, "n_vis", 0)
    if pruning is None:
        per_layer = tuple(layer_flops(n_text + n_vis, d, m) for _ in range(num_layers))
        return PrefillFlops(sum(per_layer), per_layer, 0)
    plan = pruning if isinstance(pruning, PruningPlan) else pruning.plan(n_vis, num_layers)
    if (plan.n_vis, plan.num_layers) != (n_vis, num_layers):
        raise ValueError(f"pruning: expected a plan for n_vis = {n_vis}, num_layers = "
                         f"{num_layers}, got n_vis = {plan.n_vis}, num_layers = {plan.num_layers}")
    per_layer = tuple(layer_flops(n_text + v, d, m) for v in plan.visual_tokens_per_layer())
    rank = _selector_rank(pruning, d)
    overhead = sum(_stage_overhead(plan, s, n_text, d, rank) for s in range(len(plan.stages)))
    recompute = sum(_stage_recompute(plan, s, n_text, d) for s in range(len(plan.stages)))
    return PrefillFlops(sum(per_layer) + overhead + recompute, per_layer, overhead, recompute)
