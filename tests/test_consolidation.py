"""Consolidation on the tiny model: the loss falls, runs are deterministic, the starting adapter
and layer limit are honoured, bad input is refused, and in a store the served_by label moves
context -> consolidated (or instant -> consolidated) as the background job completes."""

from __future__ import annotations

import time

import pytest
import torch

from hyperlora_integrations.adapters import InternalizedCorpus, ReferenceResolver
from hyperlora_integrations.consolidation import ConsolidationConfig, build_examples, schedule, sentences
from hyperlora_integrations.errors import EmptyDocumentError, InvalidInputError

DOC = (
    "The Varnholt Observatory was founded in 1873 by Orvella Quenby in the town of Haskmere. "
    "Its first telescope, named Bright Ember, cost 347 guilders. In 1901 the observatory moved to Pellow Hill. "
    "Dr. Anton Briese discovered the comet Kessa-7 there in 1922."
)
OTHER = "Captain Mirelle Oduya commanded the research vessel Halcyon Drift during the 2031 survey of the Tarn Shelf."
FAST = ConsolidationConfig(steps=12, batch_size=2, max_seq_tokens=96, lr=2e-2)


def test_targets_come_from_the_text_alone():
    ex = build_examples(DOC)
    assert [s for s in sentences(DOC)][-1].startswith("Dr. Anton Briese")  # no split after "Dr."
    cloze = {e.target for e in ex["cloze"]}
    assert {"1873", "Orvella Quenby", "347", "Pellow Hill", "Kessa-7"} <= cloze
    for kind in ex.values():
        for e in kind:
            assert e.target in DOC or e.target == " ".join(DOC.split())
    drawn = schedule(ex, {"recite": 1, "continuation": 1, "fact": 0, "cloze": 1}, 40, seed=3)
    assert len(drawn) == 40 and not any(e.kind == "fact" for e in drawn)
    assert drawn == schedule(ex, {"recite": 1, "continuation": 1, "fact": 0, "cloze": 1}, 40, seed=3)


def test_loss_decreases_and_result_is_deterministic(fresh_tiny_model):
    model = fresh_tiny_model
    a = model.consolidate(DOC, config=FAST, seed=1)
    b = model.consolidate(DOC, config=FAST, seed=1)
    meta = a.metadata.model_extra
    assert meta["consolidated"] is True and meta["consolidation"]["steps"] == 12
    assert meta["consolidation"]["loss_last"] < meta["consolidation"]["loss_first"]
    assert a.metadata.kind == "document" and a.rank == 8 and a.target_modules == ("down_proj",)
    for name in a.A:
        assert torch.equal(a.A[name], b.A[name]) and torch.equal(a.B[name], b.B[name])
    c = model.consolidate(DOC, config=FAST, seed=2)
    assert not torch.equal(a.A["down_proj"], c.A["down_proj"])
    # The adapter makes the document's own text more likely than before consolidation.
    q = "Tell me what the document says."
    assert model.score(q, DOC, [a]) < model.score(q, DOC)


def test_layer_limit_and_warm_start(fresh_tiny_model):
    model = fresh_tiny_model
    seen = []
    hook = model.model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(o[0].requires_grad))
    try:
        top = model.consolidate(DOC, config=FAST.model_copy(update={"layers": 1}))
    finally:
        hook.remove()
    assert seen and not any(seen)  # no graph (so no backward) below the trained layer
    assert torch.count_nonzero(top.B["down_proj"][0]) == 0  # the lower layer never trained
    assert torch.count_nonzero(top.B["down_proj"][1]) > 0
    instant = model.internalize(DOC)
    warm = model.consolidate(DOC, instant, config=FAST)
    assert warm.metadata.model_extra["consolidation"]["init"] == "instant"
    assert warm.rank == instant.rank
    assert not torch.equal(warm.folded()[1]["down_proj"], instant.folded()[1]["down_proj"])


def test_per_layer_weights_match_stacked_ones_and_keep_autograd_out_of_frozen_layers(tiny_model):
    """Top-N training hands the hooks per-layer lists: same output as stacked tensors, and no
    graph below the trained layers (the point of ``layers=``: backward stops there)."""
    model = tiny_model
    adapter = model.internalize(DOC)
    folded_a, folded_b = adapter.folded()
    A, B = folded_a["down_proj"], folded_b["down_proj"]
    ids = torch.tensor([model.encode([{"role": "user", "content": "Where is Haskmere?"}])])
    with torch.no_grad(), model.injector.activate_weights({"down_proj": A}, {"down_proj": B}):
        stacked = model.model(input_ids=ids).logits
    with torch.no_grad(), model.injector.activate_weights({"down_proj": list(A)}, {"down_proj": list(B)}):
        listed = model.model(input_ids=ids).logits
    torch.testing.assert_close(listed, stacked)
    top_a = A[-1].clone().requires_grad_(True)
    seen = []
    hook = model.model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(o[0].requires_grad))
    try:
        with (
            torch.enable_grad(),
            model.injector.activate_weights({"down_proj": [*A[:-1], top_a]}, {"down_proj": list(B)}),
        ):
            model.model(input_ids=ids).logits.sum().backward()
    finally:
        hook.remove()
    assert seen == [False] and top_a.grad is not None and top_a.grad.abs().sum() > 0


def test_frozen_layers_run_once_per_sequence_and_change_nothing(fresh_tiny_model, monkeypatch):
    from hyperlora_integrations.consolidation import frozen, trainer

    model = fresh_tiny_model
    config = FAST.model_copy(update={"layers": 1})
    calls = []
    layer0 = model.model.model.layers[0]
    hook = layer0.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    fits = []
    real_fit = trainer.fit
    monkeypatch.setattr(
        "hyperlora_integrations.consolidation.engine.fit", lambda *a, **k: fits.append(real_fit(*a, **k)) or fits[-1]
    )
    try:
        cached = model.consolidate(DOC, config=config, seed=2)
    finally:
        hook.remove()
    assert fits[-1].cached
    assert sum(calls) < config.steps * config.batch_size  # each distinct sequence once, not every step
    monkeypatch.setattr(frozen, "MAX_CACHE_BYTES", 0)  # too big to cache: plain full forwards
    plain = model.consolidate(DOC, config=config, seed=2)
    assert not fits[-1].cached
    torch.testing.assert_close(cached.B["down_proj"], plain.B["down_proj"], atol=1e-4, rtol=1e-3)


def test_bad_input_is_refused(tiny_model):
    with pytest.raises(EmptyDocumentError):
        tiny_model.consolidate("   \n ")
    with pytest.raises(InvalidInputError):
        tiny_model.consolidate(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        tiny_model.consolidate(DOC, time_budget_s=0)
    with pytest.raises(InvalidInputError, match="steps=0"):
        tiny_model.consolidate(DOC, steps=0)
    with pytest.raises(InvalidInputError, match="ConsolidationConfig"):
        tiny_model.consolidate(DOC, config={"steps": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ConsolidationConfig(steps=0)
    with pytest.raises(ValueError):
        ConsolidationConfig(stepz=3)  # misspelt field: never silently ignored
    with pytest.raises(InvalidInputError, match="target module"):
        tiny_model.consolidate(DOC, config=FAST.model_copy(update={"target_modules": ("nope",)}))


def test_time_budget_and_long_documents_in_chunks_within_byte_budget(fresh_tiny_model):
    model = fresh_tiny_model
    stopped = model.consolidate(DOC, config=FAST.model_copy(update={"steps": 500}), time_budget_s=0.5)
    info = stopped.metadata.model_extra["consolidation"]
    assert info["stopped"] == "time_budget" and info["steps"] < 500
    long_doc = " ".join([DOC, OTHER] * 6)
    one_rank_bytes = model.consolidate(DOC, config=FAST).nbytes // 8
    config = FAST.model_copy(update={"chunk_tokens": 64, "steps": 2, "max_bytes": 12 * one_rank_bytes})
    adapter = model.consolidate(long_doc, config=config)
    assert adapter.metadata.model_extra["num_chunks"] > 1
    assert adapter.nbytes <= config.max_bytes and adapter.rank == 12


def test_background_consolidation_served_by_transitions(fresh_tiny_model, store):
    model = fresh_tiny_model
    corpus = InternalizedCorpus(model, store, namespace="docs")
    [doc_id] = corpus.add_texts([DOC], consolidate="background")
    assert corpus.consolidating() == [doc_id]
    instant = store.get(doc_id, namespace="docs")
    assert not instant.metadata.model_extra.get("consolidated")
    ref = corpus.search("Who founded the Varnholt Observatory?", k=1)[0].reference
    message = [{"role": "user", "content": f"{ref} Who founded the observatory?"}]
    by_context = ReferenceResolver(store, namespaces=["docs"]).resolve(message)
    assert by_context.served_by == {doc_id: "context"} and DOC in by_context.messages[0]["content"]
    by_instant = ReferenceResolver(store, namespaces=["docs"], serve_pending="instant").resolve(message)
    assert by_instant.served_by == {doc_id: "instant"} and DOC not in by_instant.messages[0]["content"]
    with pytest.raises(InvalidInputError):
        ReferenceResolver(store, serve_pending="sometimes")

    corpus.drain(timeout=300)
    assert corpus.consolidating() == []
    stored = store.get(doc_id, namespace="docs")
    assert stored.metadata.model_extra["consolidated"] is True
    assert store.text(doc_id, namespace="docs") == DOC
    after = ReferenceResolver(store, namespaces=["docs"]).resolve(message)
    assert after.served_by == {doc_id: "consolidated"} and DOC not in after.messages[0]["content"]
    assert store.verify() == []
    # Adding it again does not consolidate twice.
    assert corpus.add_texts([DOC], consolidate="background") == [doc_id]
    assert corpus.consolidating() == []


def test_consolidate_now_and_models_without_hypernetwork(fresh_tiny_model, store):
    model = fresh_tiny_model
    model.d2l = None  # any HF model without a trained hypernetwork
    corpus = InternalizedCorpus(model, store, namespace="plain")
    with pytest.raises(Exception, match="consolidate="):
        corpus.add_texts([DOC])
    [now_id] = corpus.add_texts([DOC], consolidate="now")
    assert store.get(now_id, namespace="plain").metadata.model_extra["consolidated"] is True
    [bg_id] = corpus.add_texts([OTHER], consolidate="background")
    assert not store.contains(bg_id, namespace="plain")  # no instant adapter: text serves until done
    ref = corpus.search("Halcyon Drift captain", k=1)[0].reference
    res = ReferenceResolver(store, namespaces=["plain"], serve_pending="instant").resolve_text(ref + " Who?")
    assert res.served_by == {bg_id: "context"}
    with pytest.raises(InvalidInputError):
        corpus.add_texts([DOC], consolidate="later")


def test_fictional_fixture_and_its_evaluation_run_end_to_end(fresh_tiny_model, tmp_path):
    from hyperlora_integrations.training import eval_fictional as ev

    test, dev = ev.load_fixture("test"), ev.load_fixture("dev")
    assert len(test) >= 30 and not {d["id"] for d in test} & {d["id"] for d in dev}
    assert all(len(d["questions"]) == 3 and all(q["answer"] in d["text"] for q in d["questions"]) for d in test)
    docs = dev[:2]
    model = fresh_tiny_model
    result = ev.evaluate(model, docs, model.consolidation_config, max_new_tokens=2, cache=tmp_path)
    summary = result["summary"]
    assert summary["questions"] == 6 and set(summary["gap_closure"]) == {
        "context",
        "instant",
        "consolidated",
        "mismatched",
    }
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # cached: a rerun (or a resume after a kill) trains nothing
    again = ev.evaluate(model, docs, model.consolidation_config, generate=False, cache=tmp_path)
    assert [r["nll_consolidated"] for r in again["rows"]] == [r["nll_consolidated"] for r in result["rows"]]
    retrieval = ev.retrieval_study(model, docs, result["adapters"], max_new_tokens=2)["summary"]
    assert set(retrieval) == {"k1", "k4", "k4_cut0.5"}
    swap = ev.swap_study(model, docs, result["adapters"], max_new_tokens=2)["summary"]
    assert "context" not in swap["langchain_served_by"] and swap["langchain_served_by"].get("consolidated", 0) > 0


def test_stopping_a_worker_mid_consolidation_returns_the_job_to_the_queue(fresh_tiny_model, store):
    from hyperlora_integrations.adapters.worker import BackgroundWorker

    model = fresh_tiny_model
    model.consolidation_config = FAST.model_copy(update={"steps": 10_000})  # would run for minutes
    corpus = InternalizedCorpus(model, store, namespace="docs")
    worker = BackgroundWorker(model, store)
    store.workers[id(model)] = worker  # the corpus's worker, not started by add_texts below
    [doc_id] = corpus.add_texts([DOC], consolidate="background")
    instant = store.get(doc_id, namespace="docs")
    worker.start()
    deadline = time.monotonic() + 60
    while store.job(doc_id, namespace="docs").state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker.stop(timeout=60)
    assert not worker.running
    job = store.job(doc_id, namespace="docs")
    assert job is not None and job.state == "queued" and job.kind == "consolidate"
    kept = store.get(doc_id, namespace="docs")  # the instant adapter, untouched, never half-written
    assert not kept.metadata.model_extra.get("consolidated")
    assert all(torch.equal(kept.A[k], instant.A[k]) and torch.equal(kept.B[k], instant.B[k]) for k in kept.A)


def test_consolidate_cli_checks_its_input_before_loading_a_model(tmp_path, capsys, monkeypatch):
    from hyperlora_integrations import cli
    from hyperlora_integrations.model import HyperLoRAModel

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad command line")

    monkeypatch.setattr(HyperLoRAModel, "from_pretrained", no_model)
    assert cli.main(["consolidate"]) == 2
    assert cli.main(["consolidate", str(tmp_path / "nowhere")]) == 2
    assert cli.main(["consolidate", "--file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) != 0
    assert cli.main(["consolidate", "--file", str(tmp_path / "x.txt")]) == 2  # no --out
    err = capsys.readouterr().err
    assert "no store at" in err and "--out" in err


def test_relative_score_cutoff_drops_far_weaker_documents(fresh_tiny_model):
    from hyperlora_integrations.adapters.corpus import relative_cutoff
    from hyperlora_integrations.langchain import HyperLoRARetriever

    class H:
        def __init__(self, score):
            self.score = score

    kept = relative_cutoff([H(10.0), H(6.0), H(4.9), H(1.0)], 0.5)
    assert [h.score for h in kept] == [10.0, 6.0]
    assert len(relative_cutoff([H(3.0), H(1.0)], None)) == 2
    with pytest.raises(InvalidInputError):
        relative_cutoff([], 1.5)
    texts = [DOC, OTHER, "The Tarn Shelf is cold.", "Bright Ember was a telescope."]
    retriever = HyperLoRARetriever.from_texts(texts, model=fresh_tiny_model, k=4, consolidate=False)
    question = "Who founded the Varnholt Observatory in Haskmere in 1873, and what was its telescope?"
    assert [d.page_content for d in retriever.invoke(question)][:1] and len(retriever.invoke(question)) == 1
    everything = HyperLoRARetriever.from_texts(
        texts, model=fresh_tiny_model, k=4, consolidate=False, relative_score_cutoff=None
    )
    assert len(everything.invoke(question)) > 1


def test_recite_chars_sets_the_recitation_turns(tiny_model, monkeypatch):
    from hyperlora_integrations.consolidation import engine

    text = " ".join(f"Sentence number {i} says that the harbour of Quellin has {i} boats." for i in range(12))
    seen = []

    def spy(chunk, *, segment_chars):
        seen.append(segment_chars)
        return build_examples(chunk, segment_chars=segment_chars)

    monkeypatch.setattr(engine, "build_examples", spy)
    config = FAST.model_copy(update={"steps": 1, "recite_chars": 120})
    tiny_model.consolidate(text, config=config)
    assert seen == [120]
    recite = build_examples(text, segment_chars=120)["recite"]
    assert len(recite) > len(build_examples(text)["recite"]) and all(len(r.target) <= 120 for r in recite)


def test_chunks_are_balanced_never_a_sliver(tiny_model):
    """A document a little over ``chunk_tokens`` is one chunk (it used to be a full chunk plus a
    sliver that got a whole fit); longer ones are cut into about equal chunks between sentences,
    and text without punctuation between words."""
    from hyperlora_integrations.chat import encode_text
    from hyperlora_integrations.consolidation.engine import _chunks

    def tokens(text: str) -> int:
        return len(encode_text(tiny_model.tokenizer, text))

    n = tokens(DOC)
    just_over = f"{DOC} Its dome is green."
    assert _chunks(tiny_model, just_over, n) == ([just_over], tokens(just_over))
    long_doc = " ".join([DOC, OTHER] * 5)
    chunks, total = _chunks(tiny_model, long_doc, total_tokens := tokens(long_doc) // 3 + 1)
    sizes = [tokens(c) for c in chunks]
    assert total == tokens(long_doc) and len(chunks) == 3
    assert max(sizes) < 1.5 * min(sizes) and all(s < 1.5 * total_tokens for s in sizes)
    assert " ".join(chunks).split() == long_doc.split()  # nothing lost, nothing repeated
    words = " ".join(f"word{i}" for i in range(300))
    pieces, _ = _chunks(tiny_model, words, tokens(words) // 4)
    assert len(pieces) == 4 and " ".join(pieces) == words
