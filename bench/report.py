"""Turn benchmark JSON rows into the markdown report, the goal check and PNG plots.

python -m bench.report bench/results/<run>   (reads ops.json and, if present, prefill.json, hf_prefill.json,
                                              decode.json and host.json there)
"""
import json
import os
import sys

GOALS = """\
| goal | target | measured | met |
|---|---|---|---|
"""


def _row(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            yield r


def best(rows, op, model, batch, providers=("triton", "cuda")):
    cands = [r for r in _row(rows, op=op, model=model, batch=batch) if r["provider"] in providers]
    return min(cands, key=lambda r: r["p50_us"]) if cands else None


def goals(ops_rows, prefill_rows):
    lines = []

    def add(goal, target, measured, met):
        lines.append(f"| {goal} | {target} | {measured} | {'yes' if met else 'NO'} |")

    kernel = best(ops_rows, "score_select", "llava-1.5-7b", 1)
    eager = [r for r in _row(ops_rows, op="score_select", model="llava-1.5-7b", batch=1, provider="eager")]
    if kernel:
        add("score_select, LLaVA-1.5, B=1", "<= 8 µs", f"{kernel['p50_us']:.1f} µs ({kernel['provider']})",
            kernel["p50_us"] <= 8)
        if eager:
            e = min(eager, key=lambda r: r["p50_us"])
            ratio = e["p50_us"] / kernel["p50_us"]
            add("score_select vs eager python_ref", ">= 8x", f"{ratio:.1f}x", ratio >= 8)
    topk = [r for r in ops_rows if r["op"] == "topk_select" and r["n_vis"] <= 20000 and r["provider"] in ("triton", "cuda")]
    if topk:
        worst = max((min((x for x in topk if x["model"] == r["model"] and x["batch"] == r["batch"] and x["keep"] == r["keep"]),
                         key=lambda x: x["p50_us"]) for r in topk), key=lambda r: r["p50_us"])
        add("topk_select, N <= 20000 (slowest case, best backend)", "<= 10 µs",
            f"{worst['p50_us']:.1f} µs ({worst['model']}, B={worst['batch']})", worst["p50_us"] <= 10)
    bw = [r for r in ops_rows if r["op"] in ("bypass_align", "group_merge", "tv_score") and r["provider"] in ("triton", "cuda")
          and r["batch"] == 8]
    if bw:
        worst = min((max((x for x in bw if (x["op"], x["model"], x["keep"]) == (r["op"], r["model"], r["keep"])),
                         key=lambda x: x["frac_copy_bw"]) for r in bw), key=lambda r: r["frac_copy_bw"])
        add("bandwidth-bound ops at B=8 (worst case, best backend)", ">= 80% of copy BW",
            f"{100 * worst['frac_copy_bw']:.0f}% ({worst['op']}, {worst['model']})", worst["frac_copy_bw"] >= 0.8)
    for r in prefill_rows:
        if r["method"].startswith("hf/"):
            continue
        if r["method"] == "swiftvlm" and r["batch"] == 8 and r["budget"] in (192, 128):
            target = 2.2 if r["budget"] == 192 else 2.9
            add(f"SwiftVLM prefill speedup, budget {r['budget']}, B=8", f">= {target}x", f"{r['speedup']:.2f}x",
                r["speedup"] >= target)
        if r["method"] == "swiftvlm":
            add(f"SwiftVLM achieved / FLOPs-predicted speedup, budget {r['budget']} B={r['batch']}", ">= 0.95",
                f"{r['achieved_over_predicted']:.3f}", r["achieved_over_predicted"] >= 0.95)
            add(f"SwiftVLM ops per stage beyond vanilla, budget {r['budget']} B={r['batch']}", "<= 12",
                f"{r['ops_per_stage']:.1f}", r["ops_per_stage"] <= 12)
        if r["method"] != "vanilla" and "prune_share" in r:
            add(f"pruning steps' share, {r['method']} budget {r['budget']} B={r['batch']}", "<= 2%",
                f"{100 * r['prune_share']:.2f}%", r["prune_share"] <= 0.02)
    return GOALS + "\n".join(lines) + ("\n" if lines else "")


def e2e_goals(hf_rows, decode_rows):
    """Goal lines of bench.hf_prefill (achieved / predicted >= 0.95, no host sync in the layer loop) and
    bench.decode (attention in proportion to the cached rows, cache bytes down by exactly the rows
    dropped, nothing beyond unpruned decoding per step)."""
    lines = []

    def add(goal, target, measured, met):
        lines.append(f"| {goal} | {target} | {measured} | {'yes' if met else 'NO'} |")

    for r in hf_rows:
        if r["method"] == "vanilla":
            continue
        where = f"{r['method']} {r['budget']}, {r['family']} {r['path']} B={r['batch']}"
        add(f"prefill achieved / FLOPs-predicted, {where}", ">= 0.95", f"{r['achieved_over_predicted']:.3f}",
            r["achieved_over_predicted"] >= 0.95)
        add(f"prefill host syncs beyond vanilla, {where}", "0", f"{r['host_syncs']}", r["host_syncs"] == 0)
    for r in decode_rows:
        if r["method"] == "vanilla":
            continue
        where = f"{r['method']} {r['budget']}, {r['path']}, {r['new_tokens']} new tokens"
        add(f"decode attention / cached rows (against vanilla), {where}", "<= 1.05",
            f"{r['attention_ratio']:.3f} / {r['rows_ratio']:.3f} = {r['attention_ratio'] / r['rows_ratio']:.3f}",
            r["attention_ratio"] <= 1.05 * r["rows_ratio"])
        exact = r["bytes_dropped"] == r["rows_dropped"] * r["row_bytes"]
        add(f"decode cache bytes dropped = rows dropped x row bytes, {where}", "exact",
            f"{r['bytes_dropped']} = {r['rows_dropped']} x {r['row_bytes']}", exact)
        extra = (r["ops_per_step_beyond_vanilla"], r["host_syncs_beyond_vanilla"])
        add(f"decode ops / host syncs per step beyond vanilla, {where}", "<= 0 / 0", f"{extra[0]} / {extra[1]}",
            extra[0] <= 0 and extra[1] <= 0)
    return "\n".join(lines) + ("\n" if lines else "")


def _load(run_dir, name):
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def e2e_sections(hf_meta, decode_meta):
    """The report's sections of bench.hf_prefill and bench.decode (each when its JSON exists)."""
    text = []
    if hf_meta:
        from bench.hf_prefill import markdown as hf_md

        e = hf_meta["environment"]
        text += [f"## End-to-end prefill of transformers' models through hf.apply\n\n{hf_meta['model']}-shaped "
                 f"language model, {hf_meta['dtype']}, {hf_meta['n_text']} text tokens, 576 visual; LLaVA "
                 f"(hf.apply, and the minimal forward on the same weights in the same rounds) and Qwen2-VL; "
                 f"{e['device_name']}, {e['threads']} thread(s), clock {hf_meta.get('clock', 'wall')}, torch "
                 f"{e['torch']}, commit {e['commit']}.\n", hf_md(hf_meta["rows"])]
    if decode_meta:
        from bench.decode import markdown as decode_md

        e = decode_meta["environment"]
        text += [f"## Decoding from pruned KV caches\n\n{decode_meta['model']}-shaped language model, "
                 f"{decode_meta['dtype']}, one decoding step after the prompt (576 visual + {decode_meta['n_text']} "
                 f"text tokens) and the new tokens' cache rows; {e['device_name']}, {e['threads']} thread(s), clock "
                 f"{decode_meta.get('clock', 'wall')}, torch {e['torch']}, commit {e['commit']}.\n",
                 decode_md(decode_meta["rows"])]
    return text


def auto_table(ops_rows):
    """The measured AUTO_CUDA table: per op, kernel backends ordered by their summed p50 over the
    cases both ran, then torch (paste into swiftvlm_kernels/_backend.py)."""
    lines = ["AUTO_CUDA = {"]
    for op in sorted({r["op"] for r in ops_rows}):
        rows = [r for r in ops_rows if r["op"] == op and r["provider"] in ("triton", "cuda")]
        keys = {p: {(r["model"], r["batch"], r["keep"]) for r in rows if r["provider"] == p} for p in ("triton", "cuda")}
        common = keys["triton"] & keys["cuda"]
        total = {p: sum(r["p50_us"] for r in rows if r["provider"] == p and (r["model"], r["batch"], r["keep"]) in common)
                 for p in ("triton", "cuda")}
        order = sorted(("triton", "cuda"), key=lambda p: total[p]) if common else ["triton", "cuda"]
        names = [op] + (["bypass_align_into"] if op == "bypass_align" else [])
        for name in names:
            lines.append(f'    "{name}": ("{order[0]}", "{order[1]}", "torch"),')
    return "\n".join(lines + ["}"]) + "\n"


def plots(ops_rows, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for op in sorted({r["op"] for r in ops_rows}):
        rows = [r for r in ops_rows if r["op"] == op]
        labels = sorted({(r["model"], r["batch"], r["keep"]) for r in rows})
        providers = sorted({r["provider"] for r in rows})
        fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            ys = [next((r["p50_us"] for r in rows if (r["model"], r["batch"], r["keep"]) == lab and r["provider"] == p), 0)
                  for lab in labels]
            ax.bar([x + i * width for x in range(len(labels))], ys, width, label=p)
        ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(labels))])
        ax.set_xticklabels([f"{m}\nB={b} k={k}" for m, b, k in labels], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("p50 µs (log)")
        ax.set_title(f"{op} ({rows[0]['device_name']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(run_dir):
    from bench.ops import markdown

    all_rows = _load(run_dir, "ops.json") or []  # a folder of end-to-end runs alone has none
    ops_rows = [r for r in all_rows if "error" not in r]
    prefill_rows = []
    if os.path.exists(os.path.join(run_dir, "prefill.json")):
        with open(os.path.join(run_dir, "prefill.json")) as f:
            prefill_rows = json.load(f)["rows"]
    hf_meta, decode_meta = _load(run_dir, "hf_prefill.json"), _load(run_dir, "decode.json")
    meta = hf_meta or decode_meta or {}
    env = ops_rows[0] if ops_rows else dict(meta.get("environment", {}), copy_gbps=0, dtype=meta.get("dtype"))
    text = [f"# Benchmark report\n\n{env.get('device_name')} ({env.get('device')}, {env.get('threads')} threads) — "
            f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}, date {env.get('date')}, "
            f"dtype {env.get('dtype')}" + (f"; measured copy bandwidth {env.get('copy_gbps', 0):.0f} GB/s.\n"
                                           if ops_rows else ".\n"),
            "## Goals\n", goals(ops_rows, prefill_rows) + e2e_goals(hf_meta["rows"] if hf_meta else [],
                                                                   decode_meta["rows"] if decode_meta else [])]
    if prefill_rows:
        from bench.prefill import markdown as prefill_md

        with open(os.path.join(run_dir, "prefill.json")) as f:
            meta = json.load(f)
        e = meta["environment"]
        text += [f"## End-to-end prefill\n\n{meta['model']}-shaped language model, {meta['dtype']}, "
                 f"{meta['n_text']} text tokens; {e['device_name']}, {e['threads']} thread(s), torch {e['torch']}, "
                 f"commit {e['commit']}.\n", prefill_md(prefill_rows)]
    text += e2e_sections(hf_meta, decode_meta)
    host_path = os.path.join(run_dir, "host.json")
    if os.path.exists(host_path):
        with open(host_path) as f:
            host = json.load(f)
        text += ["## Ops per pruning stage beyond the vanilla forward (tiny LLaVA; counted)\n",
                 "| input | method | stages | extra ops | per stage | host syncs |\n|---|---|---|---|---|---|\n" + "".join(
                     f"| {label} | {r['method']} | {r['stages']} | {r['extra_launches']} | {r['ops_per_stage']:.1f} | "
                     f"{r['syncs_beyond_vanilla']} |\n" for label, rows in host["stage_ops"].items() for r in rows),
                 "## Host µs of an op call (CPU, 1 thread, tiny inputs, min over interleaved rounds)\n",
                 "| op | op layer (dispatch + checks) | op call | the function alone | call - function |\n"
                 "|---|---|---|---|---|\n" + "".join(
                     f"| {r['op']} | {r['layer_us']:.1f} | {r['op_us']:.1f} | {r['direct_us']:.1f} | {r['extra_us']:.1f} |\n"
                     for r in host["op_overhead"])]
    if all_rows:
        text += ["## Kernels\n", markdown(all_rows)]
    if any(r["provider"] in ("triton", "cuda") for r in ops_rows):
        text += ["## Measured backend order for `auto`\n", "```python\n" + auto_table(ops_rows) + "```\n"]
    for p in plots(ops_rows, run_dir):
        text.append(f"![{os.path.basename(p)}]({os.path.basename(p)})\n")
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main(sys.argv[1])
