"""Smoke tests of the benchmark harness on CPU (small shapes): it runs, and its rows are sane.

Speed goals live in the benchmark report, never here."""
import json

import pytest
import torch

import python_ref
from swiftvlm_kernels import bench


def test_harness_rows():
    rows = bench.run(models=("smoke",), batches=(1, 2), providers=("eager",), progress=False, dtype=torch.float32)
    ops = {r["op"] for r in rows}
    assert ops == set(bench.OPS)
    for r in rows:
        assert 0 < r["p20_us"] <= r["p50_us"] <= r["p80_us"]
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
    text = goals([row, eager], [dict(method="swiftvlm", batch=8, budget=192, speedup=2.5, prune_share=0.01)])
    assert "| score_select, LLaVA-1.5, B=1 | <= 8 µs | 9.0 µs (triton) | NO |" in text
    assert "| 10.0x | yes |" in text
    assert "2.50x | yes" in text


@pytest.mark.parametrize("op", ["score_select", "group_merge"])
def test_pytest_benchmark_smoke(benchmark, op):
    case = bench.cases(["smoke"], [1])[0]
    args = bench.make_inputs(op, case, torch.device("cpu"), torch.float32)
    out = benchmark(getattr(python_ref, op), *args)
    assert out[0].shape[0] == 1


def test_prefill_harness_smoke():
    from bench import bench_prefill

    rows = bench_prefill.run(smoke=True, batches=[1], budgets=[12])
    assert [r["method"] for r in rows] == ["vanilla", "fastv", "pdrop", "swiftvlm"]
    vanilla = rows[0]
    assert vanilla["speedup"] == 1.0 and vanilla["prune_share"] == 0.0
    for r in rows[1:]:
        assert r["flops"] < vanilla["flops"]  # pruning removes work (Eq. 17-19)
        assert 0.0 < r["prune_share"] < 1.0
    assert bench_prefill.markdown(rows).count("\n") == len(rows) + 2


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
