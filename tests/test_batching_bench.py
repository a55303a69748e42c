"""``hyperlora bench serve --tiny --quick``: the serving benchmark runs end to end and reports
throughput, latency percentiles and the batched-vs-serial token comparison."""

from __future__ import annotations

import json

from hyperlora_integrations.bench.cli import main as bench_main
from hyperlora_integrations.bench.serve import _first_difference, _percentile, documents, render


def test_bench_serve_tiny_quick(tmp_path, capsys):
    out = tmp_path / "serve"
    assert bench_main(["serve", "--tiny", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    results = json.loads((out / "serve.json").read_text())
    assert [lv["concurrency"] for lv in results["levels"]] == [1, 4]
    for lv in results["levels"]:
        assert lv["tokens"] == lv["concurrency"] * results["new_tokens"] == lv["concurrency"] * 8
        for mode in ("serial", "batched"):
            assert lv[mode]["tokens_per_s"] > 0 and lv[mode]["latency_p50_s"] <= lv[mode]["latency_p95_s"]
        assert lv["differing_requests"] == 0  # greedy, distinct adapters: the same tokens as serial
    four = results["levels"][1]["batched"]
    assert four["max_rows"] > 1 and four["steps"] < 4 * 8  # the 4 requests really shared steps
    assert "| 4 |" in (out / "serve.md").read_text() and "speed-up" in capsys.readouterr().out
    assert results["meta"]["tiny"] is True and len(results["serial_latencies_s"]) == 4


def test_helpers():
    docs = documents(20)
    assert len({d for d, _ in docs}) == 20 and len({q for _, q in docs}) == 20
    assert _percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and _percentile([5.0], 0.95) == 5.0
    assert _first_difference((1, 2, 3), (1, 2, 3)) is None
    assert _first_difference((1, 2, 3), (1, 5, 3)) == 1 and _first_difference((1, 2), (1, 2, 3)) == 2
    lv = {
        "concurrency": 2,
        "serial": {"tokens_per_s": 1.0, "latency_p50_s": 1.0, "latency_p95_s": 2.0},
        "batched": {"tokens_per_s": 2.0, "latency_p50_s": 1.0, "latency_p95_s": 1.0, "mean_rows_per_step": 2.0},
        "speedup": 2.0,
        "differing_requests": 1,
    }
    assert "1 of 2" in render({"new_tokens": 4, "levels": [lv]})
