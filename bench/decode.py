"""Decoding from pruned KV caches: the latency of one decoding step, its attention's share and the
cache bytes, pruned against unpruned, on the minimal LLaVA forward and on transformers' LLaVA
patched by `swiftvlm_kernels.hf.apply`.

    python -m bench.decode                     # CPU: TinyLlama-1.1B shapes, bf16, 1 thread, 64 and 256 new tokens
    python -m bench.decode --new 64 --rounds 3 --paths hf.apply

The models and inputs are bench.prefill's (576 visual tokens, 74 text tokens, random weights); the
transformers model carries the minimal forward's weights. Per path (`minimal`: models/generate.py's
`decode_step` on its per-layer KVCache; `hf.apply`: the transformers model's forward on the
DynamicCache its prefill returned, `hf.apply(model, None)` for vanilla) and method, the prefill runs
once, then each layer's cache gets the rows of G generated tokens (G = --new; their keys and values
are random: a step's cost does not depend on them) and one more decoding step is timed, the cache
rolled back after each call, so every sample runs at G new tokens. The variants run interleaved
(bench/timer.py: min and median).

Per row:
  step_ms           one decoding step (median; min alongside), embedding to logits
  step speedup      vanilla's median step / this one; FLOPs-predicted: the step's FLOPs (projections,
                    MLP and LM head fixed, attention 4 H D n_l per layer over its n_l cached rows) at
                    vanilla over at this method
  attn_ms           the step's attention alone: the scaled_dot_product_attention calls the step makes
                    (recorded from one step, then replayed with the same arguments), summed over layers;
                    interleaved rounds of their own, each sample about 20 ms of replays
  attention share   attn_ms / step_ms
  attention ratio   this method's attn_ms / vanilla's, against the cached rows' ratio (sum over layers
                    of n_l): attention should fall in proportion to the rows it reads
  cache bytes       the keys and values the caches hold (rows x KV heads x head dim x 2 x element size);
                    `dropped` = vanilla's - this one's, which must equal the rows dropped times the bytes
                    of a row; `allocated`: the minimal KVCache's buffers with their growth slack
  ops / step beyond vanilla and host syncs beyond vanilla per step (bench.host's counter)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager

import torch

from bench import prefill
from bench.host import count_ops
from bench.timer import measure
from swiftvlm_kernels import hf
from swiftvlm_kernels.hf.compat import cache_parameter, output_cache
from swiftvlm_kernels.models.generate import decode_step

PATHS = ("minimal", "hf.apply")


class MinimalState:
    """The minimal forward's caches after a prefill with `pruning`, then generated tokens' rows (`extend`)."""

    @torch.no_grad()
    def __init__(self, model, x, pruning):
        inputs = model.check_inputs(x["input_ids"], x["pixel_values"], None, pruning is not None)
        plan = model.plan_for(pruning, inputs.counts)
        seq, self.caches = model.prefill(inputs.input_ids, inputs.pixel_values, None, plan, caching=True,
                                         selector=model.selector_for(pruning, plan))
        self.model, self.gen = model, torch.Generator().manual_seed(1)
        self.token = model.lm_head(seq.h[:, -1]).argmax(-1)
        self.position = torch.full_like(self.token, inputs.input_ids.shape[1])

    def extend(self, new_tokens: int) -> None:
        """Append the rows of new_tokens generated tokens (random keys and values) to every layer."""
        for cache in self.caches:
            shape = (cache.k.shape[0], 1, *cache.k.shape[2:])
            for _ in range(new_tokens):
                cache.append(*(torch.randn(shape, generator=self.gen).to(cache.k) for _ in range(2)))
        self.position += new_tokens

    @torch.no_grad()
    def step(self):
        """One decoding step, then the caches rolled back (the next call runs at the same length)."""
        logits = decode_step(self.model, self.caches, self.token, self.position)
        for cache in self.caches:
            cache.size -= 1
        return logits

    def rows(self) -> list:
        return [c.size for c in self.caches]

    def cache_bytes(self) -> tuple[int, int]:
        """(bytes of the rows held, bytes allocated)."""
        held = sum(c.size * c.k[0, 0].numel() * c.k.element_size() * 2 * c.k.shape[0] for c in self.caches)
        return held, sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in self.caches)


class HFState:
    """The transformers model's DynamicCache after a prefill through `hf.apply(model, pruning)`, then
    generated tokens' rows (`extend`)."""

    @torch.no_grad()
    def __init__(self, model, x, pruning):
        self.model, self.pruning, self.gen = model, pruning, torch.Generator().manual_seed(1)
        hf.apply(model, pruning)
        out = model(**x, use_cache=True, logits_to_keep=1)
        self.cache = output_cache(out)
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)
        self.mask = torch.ones_like(x["input_ids"][:, :1].expand(-1, x["input_ids"].shape[1] + 1))

    def extend(self, new_tokens: int) -> None:
        for layer in self.cache.layers:
            B, H, _, D = layer.keys.shape
            layer.keys, layer.values = (torch.cat([t, torch.randn(B, H, new_tokens, D, generator=self.gen).to(t)], 2)
                                        for t in (layer.keys, layer.values))
        self.mask = torch.ones_like(self.mask[:, :1].expand(-1, self.mask.shape[1] + new_tokens))

    @torch.no_grad()
    def step(self):
        hf.apply(self.model, self.pruning)
        logits = self.model(input_ids=self.token, attention_mask=self.mask, use_cache=True, logits_to_keep=1,
                            **{cache_parameter(self.model): self.cache}).logits
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]
        return logits

    def rows(self) -> list:
        return [layer.keys.shape[2] for layer in self.cache.layers]

    def cache_bytes(self) -> tuple[int, int]:
        held = sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))
        return held, held


@contextmanager
def recorded_attention(calls: list):
    """Within the block, every torch.nn.functional.scaled_dot_product_attention call is recorded in
    `calls` (its arguments) and run."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return sdpa(*args, **kwargs)
    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def attention_of(state):
    """A function that replays the attention calls of one decoding step of `state`."""
    with recorded_attention([]) as calls:
        state.step()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention():
        for args, kwargs in calls:
            sdpa(*args, **kwargs)
    return attention


def step_flops(text, rows: list) -> int:
    """FLOPs of one decoding step of one sample: per layer the projections (GQA-sized keys and values)
    and the gated MLP, and attention over its n_l cached rows (scores and weighted values); the LM head."""
    d, m, H, Hkv, D = (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads,
                       text.head_dim)
    fixed = 2 * (2 * d * H * D + 2 * d * Hkv * D + 3 * d * m)
    return sum(fixed + 4 * H * D * n for n in rows) + 2 * d * text.vocab_size


def run(model_name="tinyllama-1.1b", new_tokens=(64, 256), budgets=(192, 128), rounds=5, dtype=torch.bfloat16,
        paths=PATHS, method_names=None, progress=print, on_row=None, clock=time.perf_counter):
    model = prefill.build(model_name, dtype, "cpu")
    x = prefill.inputs(model, 1, "cpu", dtype)
    x = dict(input_ids=x["input_ids"], pixel_values=x["pixel_values"], attention_mask=x["attention_mask"])
    other = prefill.hf_llava(model, dtype, "cpu") if "hf.apply" in paths else None
    todo = prefill.methods(model, budgets, method_names or prefill.METHODS)
    states = {}
    for path in paths:
        for name, T, p in todo:
            progress(f"{path} {name}/{T}: prefill")
            states[(path, name, T)] = MinimalState(model, x, p) if path == "minimal" else HFState(other, x, p)
    rows: list = []
    done = 0
    for G in sorted(new_tokens):
        for state in states.values():
            state.extend(G - done)
        done = G
        progress(f"timing {2 * len(states)} variants x {rounds} interleaved rounds ({G} new tokens)")
        with torch.no_grad():
            times = {("step", key): t for key, t in measure({key: state.step for key, state in states.items()}, "cpu",
                                                            rounds=rounds, sample_s=0.0, clock=clock).items()}
            # a step's attention lasts milliseconds: samples of several calls
            replays = {key: attention_of(state) for key, state in states.items()}
            times.update((("attention", key), t) for key, t in measure(replays, "cpu", rounds=rounds, sample_s=0.02,
                                                                       clock=clock).items())
            ops = {key: count_ops(state.step) for key, state in states.items()}
        for path in paths:
            base_key = (path, "vanilla", None)
            base, base_attn = times["step", base_key], times["attention", base_key]
            base_rows, base_bytes = sum(states[base_key].rows()), states[base_key].cache_bytes()[0]
            base_flops = step_flops(model.text_config, states[base_key].rows())
            text = model.text_config
            row_bytes = 2 * text.num_key_value_heads * text.head_dim * torch.finfo(dtype).bits // 8  # keys + values
            for name, T, _ in todo:
                key = (path, name, T)
                state, t, a = states[key], times["step", key], times["attention", key]
                held, allocated = state.cache_bytes()
                n_rows = sum(state.rows())
                row = dict(path=path, method=name, budget=T, new_tokens=G, step_ms=t.median * 1e3,
                           step_min_ms=t.min * 1e3, attn_ms=a.median * 1e3, attn_min_ms=a.min * 1e3,
                           rounds=t.samples, step_speedup=base.median / t.median,
                           predicted_step_speedup=base_flops / step_flops(model.text_config, state.rows()),
                           attention_share=a.median / t.median, cached_rows=n_rows, layer_rows=state.rows(),
                           rows_ratio=n_rows / base_rows, attention_ratio=a.median / base_attn.median,
                           cache_bytes=held, allocated_bytes=allocated, bytes_dropped=base_bytes - held,
                           row_bytes=row_bytes, rows_dropped=base_rows - n_rows,
                           ops_per_step_beyond_vanilla=ops[key].launches - ops[base_key].launches,
                           host_syncs_beyond_vanilla=ops[key].syncs - ops[base_key].syncs)
                rows.append(row)
                progress(format_row(row))
                if on_row is not None:
                    on_row(rows)
    if other is not None:
        hf.apply(other, None)
    return rows


def format_row(r):
    return (f"{r['path']:8s} G={r['new_tokens']} {r['method']:8s} T={r['budget']}: step {r['step_ms']:.1f} ms "
            f"(min {r['step_min_ms']:.1f}), speedup {r['step_speedup']:.3f}x (predicted "
            f"{r['predicted_step_speedup']:.3f}x), attention {r['attn_ms']:.2f} ms = "
            f"{100 * r['attention_share']:.1f}%, attention ratio {r['attention_ratio']:.3f} vs rows "
            f"{r['rows_ratio']:.3f}, cache {r['cache_bytes'] / 2**20:.2f} MiB (dropped {r['bytes_dropped']} B = "
            f"{r['rows_dropped']} rows x {r['row_bytes']} B), ops/step +{r['ops_per_step_beyond_vanilla']}, "
            f"syncs +{r['host_syncs_beyond_vanilla']}")


def markdown(rows):
    out = ("| path | new tokens | method | budget | step ms (median / min) | step speedup | FLOPs-predicted "
           "| attention ms | attention share | attention ratio | cached-rows ratio | cache MiB | bytes dropped "
           "= rows dropped x row bytes | ops / step beyond vanilla | host syncs beyond vanilla |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        exact = "yes" if r["bytes_dropped"] == r["rows_dropped"] * r["row_bytes"] else "NO"
        out += (f"| {r['path']} | {r['new_tokens']} | {r['method']} | {r['budget'] or '-'} | {r['step_ms']:.1f} / "
                f"{r['step_min_ms']:.1f} | {r['step_speedup']:.3f}x | {r['predicted_step_speedup']:.3f}x | "
                f"{r['attn_ms']:.2f} | {100 * r['attention_share']:.1f}% | {r['attention_ratio']:.3f} | "
                f"{r['rows_ratio']:.3f} | {r['cache_bytes'] / 2**20:.2f} | {r['bytes_dropped']} = {r['rows_dropped']} x "
                f"{r['row_bytes']} ({exact}) | {r['ops_per_step_beyond_vanilla']} | "
                f"{r['host_syncs_beyond_vanilla']} |\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    ap.add_argument("--new", nargs="+", type=int, default=[64, 256], help="generated tokens in the cache")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    args, env = prefill.parse_common(ap, argv)

    def save(rows):
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "model": args.model, "dtype": args.dtype, "n_text": prefill.N_TEXT,
                           "clock": args.clock, "rows": rows}, f, indent=1)

    rows = run(args.model, args.new, args.budgets, args.rounds, getattr(torch, args.dtype), args.paths,
               args.methods, on_row=save, clock=prefill.CLOCKS[args.clock])
    save(rows)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
