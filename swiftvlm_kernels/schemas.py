"""Every swiftvlm op's schema, written once. Everything that lists the ops derives from here: the
registration in ops.py, the backends' function lists, the ragged overloads' keyword-only arguments,
padded widths and counts, the Python wrappers' argument kinds, the benchmarks and the fuzz tests.

An op is a base name (`score_select`) with its overloads (`score_select.ragged`); every backend module
implements one function per base name, which every overload of that name calls (a ragged overload
passes its keyword-only arguments as trailing positional ones, widths filled in).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMAS: dict[str, str] = {
    "tv_score": "tv_score(Tensor q, Tensor k, Tensor vis_start, SymInt vis_len, float scale, "
                "Tensor? key_mask=None) -> Tensor",
    "topk_select": "topk_select(Tensor scores, SymInt k) -> (Tensor, Tensor)",
    "score_select": "score_select(Tensor q, Tensor k, Tensor vis_start, SymInt vis_len, SymInt keep, "
                    "float scale, Tensor? key_mask=None) -> (Tensor, Tensor, Tensor)",
    "group_merge": "group_merge(Tensor h, SymInt num_groups) -> (Tensor, Tensor, Tensor)",
    "bypass_align": "bypass_align(Tensor h_rest, Tensor group, Tensor merged_now, Tensor merged_then) -> Tensor",
    "bypass_align_into": "bypass_align_into(Tensor(a!) dst, Tensor rows, Tensor h_rest, Tensor group, "
                         "Tensor merged_now, Tensor merged_then) -> ()",
    "compact": "compact(Tensor h, Tensor vis_start, Tensor keep_idx, Tensor rest_idx, SymInt num_merged) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "restore": "restore(Tensor h, Tensor inverse, Tensor vis_start, Tensor rest_idx, Tensor h_rest, "
               "Tensor group, Tensor merged_rows, Tensor merged_then) -> Tensor",
    # ALVTS' importance: the attention each visual token receives from the text rows and the visual rows
    "attention_importance": "attention_importance(Tensor q, Tensor k, Tensor vis_start, SymInt vis_len, "
                            "float scale, Tensor? key_mask=None) -> (Tensor, Tensor)",
    # Ragged batches (per-sample counts as int tensors [B]): overloads of the same ops, chosen by
    # torch.ops.swiftvlm.<op>(...) when a count is a tensor. The padded widths (max_*) are keyword-only.
    "tv_score.ragged": "tv_score.ragged(Tensor q, Tensor k, Tensor vis_start, Tensor vis_len, float scale, "
                       "Tensor? key_mask=None, *, SymInt? max_vis_len=None) -> Tensor",
    "topk_select.ragged": "topk_select.ragged(Tensor scores, Tensor k, *, Tensor? lengths=None, "
                          "SymInt? max_k=None) -> (Tensor, Tensor)",
    "score_select.ragged": "score_select.ragged(Tensor q, Tensor k, Tensor vis_start, Tensor vis_len, Tensor keep, "
                           "float scale, Tensor? key_mask=None, *, SymInt? max_vis_len=None, "
                           "SymInt? max_keep=None) -> (Tensor, Tensor, Tensor)",
    "group_merge.ragged": "group_merge.ragged(Tensor h, Tensor num_groups, *, Tensor? lengths=None, "
                          "SymInt? max_groups=None) -> (Tensor, Tensor, Tensor)",
    "attention_importance.ragged": "attention_importance.ragged(Tensor q, Tensor k, Tensor vis_start, "
                                   "Tensor vis_len, float scale, Tensor? key_mask=None, *, SymInt? max_vis_len=None) "
                                   "-> (Tensor, Tensor)",
    "compact.ragged": "compact.ragged(Tensor h, Tensor vis_start, Tensor keep_idx, Tensor rest_idx, "
                      "Tensor num_merged, *, SymInt? max_merged=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    # Packed batches (FlashAttention varlen / vLLM layout): keys [total, Hkv, D] and cu_seqlens [B + 1].
    # max_seqlen only sizes the kernels' grids: left out, they cover all `total` packed keys.
    "tv_score_varlen": "tv_score_varlen(Tensor q, Tensor k, Tensor cu_seqlens, Tensor vis_start, Tensor vis_len, "
                       "float scale, *, SymInt? max_vis_len=None, SymInt? max_seqlen=None) -> Tensor",
    "score_select_varlen": "score_select_varlen(Tensor q, Tensor k, Tensor cu_seqlens, Tensor vis_start, "
                           "Tensor vis_len, Tensor keep, float scale, *, SymInt? max_vis_len=None, "
                           "SymInt? max_keep=None, SymInt? max_seqlen=None) -> (Tensor, Tensor, Tensor)",
}

# The base names, in schema order: what every backend module implements.
OPS: tuple[str, ...] = tuple(dict.fromkeys(name.split(".")[0] for name in SCHEMAS))


@dataclass(frozen=True)
class Signature:
    """An overload's arguments from its schema: (name, kind) pairs, kind one of Tensor, Tensor?,
    SymInt, SymInt? or float (a mutated Tensor(a!) reads as Tensor)."""
    positional: tuple[tuple[str, str], ...]
    keyword: tuple[tuple[str, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.positional + self.keyword)


def _signature(schema: str) -> Signature:
    params = schema[schema.index("(") + 1:schema.rindex(") ->")].split(", ")
    star = params.index("*") if "*" in params else len(params)

    def parse(p: str) -> tuple[str, str]:
        kind, name = p.split()[:2]
        return name.split("=")[0], re.sub(r"\(a!\)", "", kind)

    return Signature(tuple(parse(p) for p in params[:star]), tuple(parse(p) for p in params[star + 1:]))


SIGNATURES: dict[str, Signature] = {name: _signature(schema) for name, schema in SCHEMAS.items()}

# overload -> the positions of the arguments it writes in place (Tensor(a!)), for the overloads that write any
MUTATED: dict[str, tuple[int, ...]] = {
    name: at for name, schema in SCHEMAS.items()
    if (at := tuple(i for i, p in enumerate(schema[schema.index("(") + 1:schema.rindex(") ->")].split(", "))
                    if "!" in p.split()[0]))}


@dataclass(frozen=True)
class Widths:
    """An overload with keyword-only arguments (the ragged and packed forms): their names in schema
    order, the number of positional arguments, and for each padded width `max_X` the position and name
    of its per-sample counts (the positional argument named X or num_X; a width without counts, such as
    max_seqlen, only sizes grids)."""
    keywords: tuple[str, ...]
    positional: int
    counts: tuple[tuple[str, int, str], ...]  # (width, position of its counts, the counts' name)


def _widths(sig: Signature) -> Widths:
    names = [name for name, _ in sig.positional]
    counts = []
    for width, _ in sig.keyword:
        base = width[len("max_"):] if width.startswith("max_") else None
        at = next((i for i, n in enumerate(names) if base and n in (base, "num_" + base)), None)
        if at is not None:
            counts.append((width, at, names[at]))
    return Widths(tuple(name for name, _ in sig.keyword), len(names), tuple(counts))


# overload -> its keyword-only arguments and widths (only the overloads that have keyword-only ones)
RAGGED: dict[str, Widths] = {name: _widths(sig) for name, sig in SIGNATURES.items() if sig.keyword}
