"""``hyperlora bench structured`` end to end on the tiny model (numbers meaningless, plumbing real)."""

from __future__ import annotations

import json

import pytest
import torch

from hyperlora_integrations.bench.cli import main as bench_main
from hyperlora_integrations.bench.structured import SCHEMAS, is_valid, prompts, summarize

pytest.importorskip("jsonschema")
torch.set_num_threads(1)


def test_structured_bench_runs_and_constrained_output_is_always_valid(tmp_path):
    out = tmp_path / "structured"
    argv = ["structured", "--tiny", "--prompts", "1", "--schemas", "person,weather", "--threads", "1"]
    assert bench_main([*argv, "--max-new-tokens", "64", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert summary["pairs"] == 2 and summary["valid_rate"]["constrained"] == 1.0
    assert summary["grammar_ms_per_token"] > 0 and "constrained valid" in (out / "report.md").read_text()
    for record in results["records"]:
        assert is_valid(record["constrained"]["text"], SCHEMAS[record["schema"]])


def test_prompt_sets_and_validity_check():
    for name in SCHEMAS:
        assert len(set(prompts(name, 50))) == 50
    assert is_valid('```json\n{"city": "Oslo", "temperature_c": -4, "conditions": "snow"}\n```', SCHEMAS["weather"])
    assert not is_valid('{"city": "Oslo", "temperature_c": -4, "conditions": "hail"}', SCHEMAS["weather"])
    assert not is_valid("It is snowing in Oslo.", SCHEMAS["weather"])
    row = {"valid": True, "tokens": 10, "wall_s": 0.1, "grammar_s": 0.01, "grammar_calls": 10}
    summary = summarize([{"schema": "weather", "prompted": {**row, "valid": False}, "constrained": row}])
    assert summary["valid_rate"] == {"prompted": 0.0, "constrained": 1.0}
    assert summary["grammar_overhead_vs_free_step"] == pytest.approx(0.1)


def test_structured_bench_shards_resume_and_merge(tmp_path, capsys):
    base = ["structured", "--tiny", "--prompts", "2", "--schemas", "person,weather", "--threads", "1"]
    base += ["--max-new-tokens", "48", "--quiet"]
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    assert bench_main([*base, "--shard", "0/2", "--out", str(a)]) == 0
    assert bench_main([*base, "--shard", "1/2", "--out", str(b)]) == 0
    first = json.loads((a / "results.json").read_text())
    assert first["summary"]["pairs"] == 2  # every other pair of 4
    # a rerun of a finished shard redoes nothing: same records, same texts
    assert bench_main([*base, "--shard", "0/2", "--out", str(a)]) == 0
    assert json.loads((a / "results.json").read_text())["records"] == first["records"]
    assert bench_main(["structured", "--merge", str(a), str(b), "--out", str(merged)]) == 0
    summary = json.loads((merged / "results.json").read_text())["summary"]
    assert summary["pairs"] == 4 and summary["valid_rate"]["constrained"] == 1.0
    assert bench_main(["structured", "--shard", "2/2", "--tiny", "--out", str(tmp_path / "c")]) == 2
    assert "--shard" in capsys.readouterr().err
