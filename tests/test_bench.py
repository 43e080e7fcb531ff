"""Smoke tests of the benchmark harness on CPU (small shapes): it runs, and its rows are sane.

Speed goals live in the benchmark report, never here."""
import json

import pytest
import torch

import python_ref
from bench import ops as bench
from bench import host, prefill, timer


def test_harness_rows():
    rows = bench.run(models=("smoke",), batches=(1, 2), providers=("eager", "cpu"), progress=False, dtype=torch.float32)
    ops = {r["op"] for r in rows}
    assert ops == set(bench.OPS)
    assert {r["provider"] for r in rows} == {"eager", "cpu"}
    for r in rows:
        assert 0 < r["p20_us"] <= r["p50_us"] <= r["p80_us"]
        if r["provider"] == "cpu":  # the cpu backend's results are python_ref's
            assert r["max_diff"] == 0.0 and r["index_mismatches"] == 0, r
        assert r["gbps"] > 0 and r["copy_gbps"] > 0
        for key in ("device_name", "torch", "triton", "commit", "model", "batch", "keep", "merge"):
            assert key in r
    json.dumps(rows)  # serialisable as committed
    table = bench.markdown(rows)
    assert table.count("\n") == len(rows) + 2


def test_cases_follow_the_keep_and_merge_rule():
    cs = bench.cases(["llava-1.5-7b"], [1])
    assert [(c.keep, c.merge) for c in cs] == [(192, 19), (128, 22)]


def test_report_goals_flag_misses():
    from bench.report import goals

    row = dict(op="score_select", model="llava-1.5-7b", batch=1, provider="triton", p50_us=9.0, keep=192, n_vis=576)
    eager = dict(row, provider="eager", p50_us=90.0)
    swift = dict(method="swiftvlm", batch=8, budget=192, speedup=2.5, prune_share=0.01, achieved_over_predicted=0.9,
                 ops_per_stage=9.7)
    text = goals([row, eager], [swift])
    assert "| score_select, LLaVA-1.5, B=1 | <= 8 µs | 9.0 µs (triton) | NO |" in text
    assert "| 10.0x | yes |" in text
    assert "2.50x | yes" in text
    assert "| >= 0.95 | 0.900 | NO |" in text and "| <= 12 | 9.7 | yes |" in text and "| 1.00% | yes |" in text


@pytest.mark.parametrize("op", ["score_select", "group_merge"])
def test_pytest_benchmark_smoke(benchmark, op):
    case = bench.cases(["smoke"], [1])[0]
    args = bench.make_inputs(op, case, torch.device("cpu"), torch.float32)
    out = benchmark(getattr(python_ref, op), *args)
    assert out[0].shape[0] == 1


def test_prefill_harness_smoke():
    rows = prefill.run("smoke", batches=[1], budgets=[12], rounds=2, dtype=torch.float32, device="cpu",
                       progress=lambda *a: None)
    assert [r["method"] for r in rows] == ["vanilla", "fastv", "pdrop", "swiftvlm", "alvts"]
    vanilla = rows[0]
    assert vanilla["speedup"] == 1.0 and vanilla["predicted_speedup"] == 1.0
    for r in rows[1:]:
        assert r["flops"] < vanilla["flops"] and r["predicted_speedup"] > 1  # pruning removes work (Eq. 17-19)
        assert 0.0 < r["prune_share"] < 1.0 and r["host_syncs"] == 0
        assert 0 < r["ops_per_stage"] <= 13  # tests/test_engine.py guards each method's count
        assert abs(r["avg_visual_tokens"] - 12) <= 0.5  # the budget rule
    assert prefill.markdown(rows).count("\n") == len(rows) + 2


def test_timer_interleaves_and_orders_quantiles():
    calls = []
    t = timer.measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, sample_s=0)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then interleaved rounds
    for v in t.values():
        assert 0 < v.min <= v.p20 <= v.median <= v.p80 and v.samples == 3
    env = timer.environment("cpu")
    for key in ("device_name", "threads", "torch", "commit", "date"):
        assert env[key]


def test_host_overhead_rows():
    rows = host.op_overhead(rounds=2)
    assert [r["op"] for r in rows] == list(bench.OPS)
    for r in rows:
        assert r["direct_us"] > 0 and r["op_us"] > 0 and r["layer_us"] > 0


def test_report_auto_table_orders_by_measured_time():
    from bench.report import auto_table

    rows = [dict(op="score_select", provider=p, model="m", batch=1, keep=3, p50_us=t)
            for p, t in (("triton", 5.0), ("cuda", 4.0), ("eager", 90.0))]
    rows.append(dict(op="bypass_align", provider="triton", model="m", batch=1, keep=3, p50_us=1.0))
    table = auto_table(rows)
    assert '"score_select": ("cuda", "triton", "torch")' in table
    assert '"bypass_align_into": ("triton", "cuda", "torch")' in table  # unmeasured pair keeps the default


def test_a_failing_case_is_reported_not_fatal(monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setitem(bench.__dict__, "get_fn", lambda provider, op, dev: (broken, None) if provider == "compile"
                        else (getattr(python_ref, op), None))
    rows = bench.run(models=("smoke",), batches=(1,), ops=("topk_select",), providers=("eager", "compile"),
                     progress=False, dtype=torch.float32)
    assert [("error" in r) for r in rows] == [False, True, False, True]
    assert "FAILED topk_select / compile" in bench.markdown(rows) and "RuntimeError: boom" in bench.markdown(rows)


def test_bench_ragged_smoke():
    """bench.ragged on small counts: the ragged call equals the per-sample calls (checked inside) and
    issues one call per op where the singles issue one per sample."""
    from bench import ragged
    rows = {r["variant"]: r for r in ragged.run(counts=(5, 9, 7), rounds=1)}
    assert rows["ragged"]["op_calls"] == 2 and rows["singles"]["op_calls"] == 6
    assert rows["ragged"]["model_bytes"] > rows["singles"]["model_bytes"]  # padded to the longest sample


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_hf_prefill_harness_smoke(family):
    """bench.hf_prefill on the smoke model: one row per method, the plan's FLOPs below vanilla's, no host
    sync in the layer loop (the input checks read input_ids once), the stages' ops within bounds."""
    from bench import hf_prefill

    rows = hf_prefill.run(family, "smoke", budgets=[12], rounds=1, dtype=torch.float32, device="cpu",
                          progress=lambda *a: None)
    methods = ["vanilla", "fastv", "pdrop", "swiftvlm", "alvts"]
    paths = ["hf.apply", "minimal"] if family == "llava" else ["hf.apply"]  # LLaVA: the minimal forward alongside
    assert [(r["path"], r["method"]) for r in rows] == [(p, m) for p in paths for m in methods]
    for path in paths:
        vanilla, *pruned = [r for r in rows if r["path"] == path]
        assert vanilla["speedup"] == 1.0 and vanilla["predicted_speedup"] == 1.0
        for r in pruned:
            assert r["family"] == family and r["flops"] < vanilla["flops"]
            assert r["host_syncs"] == 0, r  # the layer loop and its stages read nothing back
            assert abs(r["avg_visual_tokens"] - 12) <= 0.5
            if path == "hf.apply":
                assert r["check_syncs"] >= 1  # ... the input checks do (the host copy of input_ids)
                assert 0 < r["ops_per_stage"] <= 24, r  # the minimal forward's stage, the decoder's tap and mask
            else:
                assert 0 < r["ops_per_stage"] <= 13, r
    assert hf_prefill.markdown(rows).count("\n") == len(rows) + 2


def test_decode_harness_smoke():
    """bench.decode on the smoke model: every layer's cache holds the rows its prefill kept plus the
    generated ones, alike on both paths; the cache bytes fall by exactly the rows dropped; decoding from
    a pruned cache issues no op and no host sync beyond the unpruned decoding."""
    from bench import decode

    rows = decode.run("smoke", new_tokens=(3, 5), budgets=[12], rounds=1, dtype=torch.float32,
                      progress=lambda *a: None)
    model = prefill.build("smoke", torch.float32, "cpu")
    plans = {(name, T): model.plan_for(p) for name, T, p in prefill.methods(model, [12])}
    assert [(r["new_tokens"], r["path"], r["method"]) for r in rows] == \
        [(G, path, m) for G in (3, 5) for path in decode.PATHS for m, _ in plans]
    L = prefill.N_TEXT + model.num_visual_tokens
    row_bytes = 2 * model.text_config.num_key_value_heads * model.head_dim * 4  # keys and values, fp32
    for r in rows:
        plan, G = plans[(r["method"], r["budget"])], r["new_tokens"]
        want = [L + G] * model.num_layers if plan is None else \
            [prefill.N_TEXT + v + G for v in plan.visual_tokens_per_layer()]
        assert r["layer_rows"] == want, r
        assert r["cache_bytes"] == sum(want) * row_bytes and r["row_bytes"] == row_bytes
        assert r["rows_dropped"] == (L + G) * model.num_layers - sum(want)
        assert r["bytes_dropped"] == r["rows_dropped"] * row_bytes
        assert r["ops_per_step_beyond_vanilla"] == 0 and r["host_syncs_beyond_vanilla"] == 0, r
        assert 0 < r["attention_share"] < 1 and r["step_ms"] > 0
        assert r["allocated_bytes"] >= r["cache_bytes"]
    assert decode.markdown(rows).count("\n") == len(rows) + 2


def test_report_e2e_goals_flag_misses():
    from bench.report import e2e_goals

    prefill_row = dict(method="swiftvlm", budget=128, family="llava", path="hf.apply", batch=1,
                       achieved_over_predicted=0.9, host_syncs=0)
    decode_row = dict(method="fastv", budget=192, path="minimal", new_tokens=64, attention_ratio=0.5, rows_ratio=0.4,
                      bytes_dropped=1024, rows_dropped=1, row_bytes=1024, ops_per_step_beyond_vanilla=0,
                      host_syncs_beyond_vanilla=1)
    text = e2e_goals([prefill_row], [decode_row])
    assert "hf.apply B=1 | >= 0.95 | 0.900 | NO |" in text and "host syncs beyond vanilla, swiftvlm 128" in text
    assert "0.500 / 0.400 = 1.250 | NO |" in text and "| exact | 1024 = 1 x 1024 | yes |" in text
    assert "| <= 0 / 0 | 0 / 1 | NO |" in text
