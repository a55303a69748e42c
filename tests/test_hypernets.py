"""Doc-to-LoRA and Text-to-LoRA on the tiny model: shapes, chunking, training, checkpoints."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from hyperlora_integrations.chat import context_prefix, encode_text
from hyperlora_integrations.encoders.activations import document_activations
from hyperlora_integrations.errors import (
    BaseModelMismatchError,
    CheckpointError,
    DocumentTooLargeError,
    EmptyDocumentError,
    UnsafeFileError,
)
from hyperlora_integrations.hypernets import DocToLoRA, TextToLoRA
from hyperlora_integrations.hypernets import checkpoint as ckpt
from hyperlora_integrations.testing import tiny_hyperlora_model as make_tiny_model
from hyperlora_integrations.training.tasks import Example
from hyperlora_integrations.training.train_d2l import distill_loss
from hyperlora_integrations.training.train_t2l import sft_loss

DOC = "The Varnholt Observatory was founded in 2031 by Ilse Tramweg on the island of Skelmoor. "


@pytest.mark.parametrize("n_tokens", [1, 17, 64, 65, 300])
def test_internalize_shapes_for_any_length(tiny_model, n_tokens):
    ids = tiny_model.tokenizer(DOC * 40, add_special_tokens=False).input_ids[:n_tokens]
    text = tiny_model.tokenizer.decode(ids)
    adapter = tiny_model.internalize(text)
    chunks = -(-tiny_model.count_tokens(text) // tiny_model.d2l.config.chunk_len)
    L = tiny_model.injector.num_layers
    d_in, d_out = tiny_model.injector.shapes["down_proj"]
    assert adapter.A["down_proj"].shape == (L, 8 * chunks, d_in)
    assert adapter.B["down_proj"].shape == (L, d_out, 8 * chunks)
    assert adapter.metadata.num_chunks == chunks and adapter.kind == "document"


def test_chunk_adapters_are_rank_concatenated(tiny_model):
    chunk_len = tiny_model.d2l.config.chunk_len
    ids = tiny_model.tokenizer(DOC * 20, add_special_tokens=False).input_ids[: 2 * chunk_len]
    first, second = (tiny_model.tokenizer.decode(ids[:chunk_len]), tiny_model.tokenizer.decode(ids[chunk_len:]))
    whole = tiny_model.internalize(tiny_model.tokenizer.decode(ids))
    parts = [tiny_model.internalize(first), tiny_model.internalize(second)]
    if tiny_model.count_tokens(first) != chunk_len:  # decode/encode round trip moved a boundary
        pytest.skip("tokenization is not stable at this chunk boundary")
    expected = torch.cat([p.A["down_proj"] for p in parts], dim=1)
    assert torch.allclose(whole.A["down_proj"], expected, atol=1e-5)


def test_untrained_hypernets_give_zero_delta():
    model = make_tiny_model()
    d2l = DocToLoRA.for_model(model, chunk_len=32)
    t2l = TextToLoRA.for_model(model, embed_dim=model.model.config.hidden_size)
    model.d2l, model.t2l = d2l, t2l
    for adapter in (model.internalize(DOC), model.generate_skill("Summarize text.")):
        assert adapter.folded()[1]["down_proj"].abs().max() == 0


def test_bad_documents_are_refused(tiny_model):
    with pytest.raises(EmptyDocumentError):
        tiny_model.internalize("   \n\t ")
    small = DocToLoRA(tiny_model.d2l.config.model_copy(update={"max_document_tokens": 10}))
    small.load_state_dict(tiny_model.d2l.state_dict())
    with pytest.raises(DocumentTooLargeError):
        small.internalize(tiny_model, DOC * 5)


def _args(**kw):
    base = {"chunk_len": 64, "top_k": 8, "l1": 0.0, "max_input_tokens": 64, "max_target_tokens": 16}
    return argparse.Namespace(**(base | kw))


def _distill_kls(model, net, qas, steps: int, lr: float, **kw) -> list[float]:
    """Fit ``net`` with the D2L loss on DOC for ``steps`` Adam steps; the KL after each."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    prefix = context_prefix(model.tokenizer)
    kls = []
    for _ in range(steps):
        loss, info = distill_loss(model, net, [DOC], qas, _args(**kw), prefix)
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(info["kl"])
    return kls


def test_short_d2l_training_lowers_the_distillation_loss():
    torch.manual_seed(0)
    model = make_tiny_model(seed=1)
    net = DocToLoRA.for_model(model, chunk_len=64, latent_dim=32, num_latents=4, num_blocks=1)
    qas = [("Who founded the observatory?", "Ilse Tramweg."), ("When?", "In 2031.")]
    kls = _distill_kls(model, net, qas, steps=40, lr=3e-3)
    assert sum(kls[-5:]) / 5 < 0.7 * sum(kls[:5]) / 5


def _sft_losses(model, net, emb, examples, steps: int) -> list[float]:
    """Fit ``net`` with the T2L SFT loss for ``steps`` Adam steps (lr 1e-2); the CE after each."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        ce, _ = sft_loss(model, net, emb, examples, _args(), 0.0)
        opt.zero_grad()
        ce.backward()
        opt.step()
        losses.append(float(ce.detach()))
    return losses


def test_short_t2l_training_lowers_the_sft_loss():
    torch.manual_seed(0)
    model = make_tiny_model(seed=2)
    net = TextToLoRA.for_model(model, latent_dim=32, embed_dim=model.model.config.hidden_size)
    emb = net.encoder(model).encode_many(["Answer with the capital city.", "Answer with the capital city."])
    examples = [Example("France?", "Paris"), Example("Italy?", "Rome")]
    losses = _sft_losses(model, net, emb, examples, steps=50)
    # a random 2-layer model starts near log(vocab) = 10.8 nats; the generated adapter alone
    # (zero at initialisation) must lower it measurably
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


@pytest.mark.parametrize("kind", ["d2l", "t2l"])
def test_checkpoint_round_trip(tiny_model, tmp_path, kind):
    net = tiny_model.d2l if kind == "d2l" else tiny_model.t2l
    ckpt.save(net, tmp_path / kind, dtype=torch.float32)
    back = ckpt.load(tmp_path / kind)
    assert back.config == net.config
    for (k, v), (k2, v2) in zip(net.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    half = ckpt.save(net, tmp_path / f"{kind}-half")
    assert (half / "model.safetensors").stat().st_size < (tmp_path / kind / "model.safetensors").stat().st_size


def test_checkpoint_refusals(tiny_model, tmp_path):
    path = ckpt.save(tiny_model.d2l, tmp_path / "d2l")
    other = make_tiny_model(seed=0)
    # a base model with another architecture
    from hyperlora_integrations import HyperLoRAModel
    from hyperlora_integrations.testing import tiny_base_model

    wide = HyperLoRAModel(tiny_base_model(layers=3))
    with pytest.raises(BaseModelMismatchError):
        HyperLoRAModel(wide.base, d2l=ckpt.load(path))
    assert HyperLoRAModel(other.base, d2l=ckpt.load(path)).d2l is not None
    # corrupt config, wrong shapes, pickle
    cfg = json.loads((path / "config.json").read_text())
    cfg["latent_dim"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        ckpt.load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        ckpt.load(path)
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text(tiny_model.d2l.config.model_dump_json())
    (bad / "model.safetensors").write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(UnsafeFileError):
        ckpt.load(bad)


def test_skill_routing_picks_the_right_skill(tiny_model):
    from hyperlora_integrations.skills import SkillLibrary

    lib = SkillLibrary(tiny_model, threshold=-1.0)
    descriptions = {
        "sentiment": "Classify the sentiment of a movie review as positive or negative.",
        "french": "Translate English sentences into French.",
        "sql": "Write a SQL query that answers a question about a database table.",
    }
    for name, desc in descriptions.items():
        lib.add(name, desc)
    for name, desc in descriptions.items():
        assert lib.route(desc).name == name
    assert lib.get("sql").adapter.kind == "skill"


def test_long_documents_scale_chunk_adapters_beyond_the_trained_count(tiny_model):
    """More chunks than training combined: each chunk is scaled by trained / n."""
    net = tiny_model.d2l
    n_chunks = 4 * net.config.trained_chunks
    text = " ".join(f"Sentence {i} says the value of item {i} is {i * 7}." for i in range(400))
    adapter = tiny_model.internalize(text)
    n = adapter.metadata.num_chunks
    assert n >= n_chunks
    rank = net.config.lora.rank
    # the first chunk alone, as a one-chunk document would give it (no scaling)
    from hyperlora_integrations.chat import encode_text

    first = tiny_model.tokenizer.decode(encode_text(tiny_model.tokenizer, text)[: net.config.chunk_len])
    single = tiny_model.internalize(first)
    assert single.metadata.num_chunks == 1
    _, b_long = adapter.folded()
    _, b_one = single.folded()
    expected = net.config.trained_chunks / n
    got = b_long["down_proj"][..., :rank]
    assert torch.allclose(got, b_one["down_proj"] * expected, atol=1e-5, rtol=1e-4)
    # up to the trained count, chunks are concatenated unscaled
    short = " ".join(text.split()[: 60 * net.config.trained_chunks])
    few = tiny_model.internalize(short)
    if few.metadata.num_chunks <= net.config.trained_chunks:
        assert few.scaling == 1.0 and few.folded()[1]["down_proj"][..., :rank].abs().sum() > 0


def test_training_cli_stops_on_time_and_resumes(tmp_path):
    """--max-minutes saves a resumable state; the same command continues from that step."""
    from hyperlora_integrations.training import train_d2l

    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps([{"passage": DOC, "qas": [["Who founded it?", "Ilse Tramweg."]]}] * 3))
    out = tmp_path / "run"
    common = ["--tiny", "--docs-json", str(docs), "--out", str(out), "--accum", "1", "--chunk-len", "64"]
    common += ["--latent-dim", "32", "--num-latents", "4", "--num-blocks", "1", "--steps", "50", "--device", "cpu"]
    train_d2l.main([*common, "--max-minutes", "1e-9"])
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1]
    assert (out / "checkpoint" / "model.safetensors").is_file()
    train_d2l.main([*common, "--steps", "3"])
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]


def test_d2l_evaluation_reports_the_mismatched_document_control(tiny_model):
    from hyperlora_integrations.training.data import EvalItem
    from hyperlora_integrations.training.eval_d2l import evaluate

    items = [
        EvalItem(DOC, "Who founded the observatory?", ["Ilse Tramweg"], "a"),
        EvalItem("The river Olm floods every spring near the town of Brask.", "Which river floods?", ["Olm"], "a"),
        EvalItem("Copper conducts heat better than steel.", "Which metal conducts heat better?", ["Copper"], "b"),
        EvalItem("The Pell tower is 212 metres tall.", "How tall is the Pell tower?", ["212 metres"], "b"),
    ]
    result = evaluate(tiny_model, items, generate=True, max_new_tokens=2)
    rows, summary = result["rows"], result["summary"]
    for row in rows:
        # the control is another passage's adapter, so it scores differently from the matched one
        assert row["nll_mismatched"] != row["nll_adapter"]
        assert {"f1_none", "f1_context", "f1_adapter"} <= set(row) and "f1_mismatched" not in row
    assert set(summary["nll"]) == {"none", "context", "adapter", "mismatched"}
    spec, match, mis = summary["gap_closure_specific"], summary["gap_closure"], summary["gap_closure_mismatched"]
    assert spec["mean"] == pytest.approx(match["mean"] - mis["mean"], abs=1e-9)

    with_consolidated = evaluate(tiny_model, items[:2], generate=True, max_new_tokens=2, consolidated=True)
    rows, summary = with_consolidated["rows"], with_consolidated["summary"]
    assert all(r["nll_consolidated"] != r["nll_consolidated_mismatched"] for r in rows)
    assert {"consolidated", "consolidated_mismatched"} <= set(summary["nll"])
    assert "f1_consolidated" in rows[0] and "f1_consolidated_mismatched" not in rows[0]
    assert summary["gap_closure_consolidated_specific"]["n"] == 2


def test_doc_weighting_puts_the_loss_where_the_document_matters():
    """With --doc-weight-floor the loss is a KL weighted by the document's effect; it still trains."""
    torch.manual_seed(0)
    model = make_tiny_model(seed=1)
    net = DocToLoRA.for_model(model, chunk_len=64, latent_dim=32, num_latents=4, num_blocks=1)
    prefix = context_prefix(model.tokenizer)
    qas = [("Who founded the observatory?", "Ilse Tramweg.")]
    plain, _ = distill_loss(model, net, [DOC], qas, _args(), prefix)
    weighted, info = distill_loss(model, net, [DOC], qas, _args(doc_weight_floor=0.05), prefix)
    assert torch.isfinite(weighted) and float(weighted.detach()) != pytest.approx(float(plain.detach()))
    kls = _distill_kls(model, net, qas, steps=30, lr=3e-3, doc_weight_floor=0.05)
    assert sum(kls[-5:]) / 5 < sum(kls[:5]) / 5


def _delta(A, B):
    return {m: torch.einsum("lor,lri->loi", B[m], A[m]) for m in A}


def test_centred_d2l_starts_as_the_identity_and_round_trips(tiny_model, tmp_path):
    """Centring subtracts the reference mean and adds a static adapter initialised to that mean."""
    torch.manual_seed(0)
    net = DocToLoRA(tiny_model.d2l.config.model_copy(update={"center_bank": 2}))
    missing, unexpected = net.load_state_dict(tiny_model.d2l.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("static_", "ref_")) for k in missing)
    bank = []
    for text in (DOC, "The river Olm floods every spring near the town of Brask."):
        from hyperlora_integrations.encoders.activations import document_activations

        ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
        A, B = net(document_activations(tiny_model.model, ids, context_prefix(tiny_model.tokenizer))[None])
        bank.append(({m: a[0] for m, a in A.items()}, {m: b[0] for m, b in B.items()}))
    net.set_reference(bank)
    net.init_static_from_reference()
    cA, cB = net.centering(1.0)
    assert _delta(cA, cB)["down_proj"].abs().max() < 1e-6  # -mean + static = 0 at the start
    cA, cB = net.centering(2.0)  # two chunks: minus twice the mean, plus the static once
    mean = sum(_delta(a, b)["down_proj"] for a, b in bank) / 2
    assert torch.allclose(_delta(cA, cB)["down_proj"], -mean, atol=1e-5)
    assert [a["down_proj"].shape for a, _ in net.reference_bank()] == [a["down_proj"].shape for a, _ in bank]
    path = ckpt.save(net, tmp_path / "centred", dtype=torch.float32)
    back = ckpt.load(path)
    assert back.config.center_bank == 2
    for (k, v), (k2, v2) in zip(net.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    from hyperlora_integrations import HyperLoRAModel

    centred = HyperLoRAModel(tiny_model.base, d2l=back)
    adapter = centred.internalize(DOC)
    assert adapter.rank == net.config.lora.rank * (1 + 2 * 2)  # the chunk, the reference bank, the static


def test_centred_training_cli_runs_from_a_plain_checkpoint_and_resumes(tiny_model, tmp_path):
    from hyperlora_integrations.training import train_d2l

    plain = ckpt.save(tiny_model.d2l, tmp_path / "plain", dtype=torch.float32)
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps([{"passage": DOC, "qas": [["Who founded it?", "Ilse Tramweg."]]}] * 4))
    out = tmp_path / "run"
    cfg = tiny_model.d2l.config
    common = ["--tiny", "--docs-json", str(docs), "--out", str(out), "--accum", "2", "--center", "2"]
    common += ["--chunk-len", str(cfg.chunk_len), "--latent-dim", str(cfg.latent_dim)]
    common += ["--num-latents", str(cfg.num_latents), "--num-blocks", str(cfg.num_blocks), "--init", str(plain)]
    train_d2l.main([*common, "--steps", "2"])
    train_d2l.main([*common, "--steps", "3"])
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert ckpt.load(out / "checkpoint").config.center_bank == 2


OTHER_DOC = "The Quellmar Bridge was opened in 1987 by Tomas Eberlin across the river Sauk. "


def test_contrastive_term_makes_adapters_document_specific():
    """With --contrast, a document's own adapter comes to fit its teacher better than another's.

    The tiny random model's teachers differ little between documents (KL ~1e-5), so the check is
    relative: the same run with the term switched off (weight ~0, still measured) separates far less.
    """
    model = make_tiny_model(seed=1)
    prefix = context_prefix(model.tokenizer)
    docs = {
        DOC: [("Who founded the observatory?", "Ilse Tramweg.")],
        OTHER_DOC: [("Who opened the bridge?", "Tomas Eberlin.")],
    }
    acts = {d: document_activations(model.model, encode_text(model.tokenizer, d)[:64], prefix) for d in docs}

    def final_gap(weight: float) -> float:
        torch.manual_seed(0)
        net = DocToLoRA.for_model(model, chunk_len=64, latent_dim=32, num_latents=4, num_blocks=1)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        gaps = []
        for step in range(50):
            doc, other = list(docs)[step % 2], list(docs)[(step + 1) % 2]
            args = _args(contrast=weight, contrast_margin=0.1)
            loss, info = distill_loss(model, net, [doc], docs[doc], args, prefix, negative=acts[other])
            opt.zero_grad()
            loss.backward()
            opt.step()
            gaps.append(info["ce_gap"])
        assert gaps[0] == pytest.approx(0.0, abs=1e-6)  # near-zero initial adapters: nothing to tell apart
        return sum(gaps[-6:]) / 6

    with_term, without = final_gap(1.0), final_gap(1e-9)
    assert with_term > 0 and with_term > 5 * abs(without)


def test_contrastive_term_reaches_the_negative_adapter_and_is_off_by_default():
    model = make_tiny_model(seed=1)
    net = DocToLoRA.for_model(model, chunk_len=64, latent_dim=32, num_latents=4, num_blocks=1)
    with torch.no_grad():  # leave the near-zero initialisation so the negative adapter matters
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prefix = context_prefix(model.tokenizer)
    negative = document_activations(model.model, encode_text(model.tokenizer, OTHER_DOC), prefix).requires_grad_()
    qas = [("Who founded the observatory?", "Ilse Tramweg.")]
    plain, info = distill_loss(model, net, [DOC], qas, _args(), prefix, negative=negative)
    assert "ce_gap" not in info
    with_term, info = distill_loss(model, net, [DOC], qas, _args(contrast=1.0, contrast_margin=0.1), prefix, negative)
    assert "ce_gap" in info and float(with_term.detach()) != pytest.approx(float(plain.detach()))
    with_term.backward()
    assert negative.grad is not None and negative.grad.abs().sum() > 0


def test_centred_l1_counts_only_generated_weights(tiny_model):
    net = DocToLoRA(tiny_model.d2l.config.model_copy(update={"center_bank": 2}))
    net.load_state_dict(tiny_model.d2l.state_dict(), strict=False)
    prefix = context_prefix(tiny_model.tokenizer)
    chunk = encode_text(tiny_model.tokenizer, DOC)[: net.config.chunk_len]
    acts = document_activations(tiny_model.model, chunk, prefix)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("static_"):
                p.fill_(3.0)  # a large static adapter must not enter the penalty
        _, B = net(acts[None])
    expected = sum(b[0].abs().mean() for b in B.values()) / len(B)
    _, info = distill_loss(tiny_model, net, [DOC], [("Who?", "Ilse.")], _args(l1=1.0), prefix)
    # (the training pass reads the chunk's activations from inside the teacher prompt, so they
    # differ from a standalone encoding in the last digits; the static block would add ~1.0)
    assert info["l1"] == pytest.approx(float(expected), rel=5e-2)


def test_t2l_contrastive_term_separates_matched_from_mismatched_descriptions():
    from hyperlora_integrations.training.train_t2l import contrastive_sft_loss

    model = make_tiny_model(seed=2)
    emb_net = TextToLoRA.for_model(model, latent_dim=32, embed_dim=model.model.config.hidden_size)
    emb = emb_net.encoder(model).encode_many(["Answer with the capital city.", "Answer with the currency."])
    examples = [Example("France?", "Paris"), Example("Money of Japan?", "Yen")]

    def final_gap(weight: float) -> float:
        torch.manual_seed(0)
        net = TextToLoRA.for_model(model, latent_dim=32, embed_dim=model.model.config.hidden_size)
        net.set_embedding_stats(emb)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        args = _args(contrast_margin=0.5)
        for _ in range(30):
            ce, _, hinge, gap = contrastive_sft_loss(model, net, emb, emb.flip(0), examples, args, 0.0)
            opt.zero_grad()
            (ce + weight * hinge).backward()
            opt.step()
        return float(gap)

    # Each input alone tells its answer, so plain SFT needs no description (it still separates
    # the two adapters somewhat by memorising); the term must add separation on top of that.
    with_term, without = final_gap(1.0), final_gap(0.0)
    assert with_term > 0.3 and with_term > without + 0.03


def test_t2l_training_cli_with_contrast_resumes(tmp_path):
    from hyperlora_integrations.training import train_t2l

    tasks = [
        {"name": f"t{i}", "descriptions": [f"Answer with the {w}.", f"Give the {w}."], "examples": ex}
        for i, (w, ex) in enumerate(
            [
                ("capital city", [{"input": "France?", "target": "Paris"}, {"input": "Italy?", "target": "Rome"}]),
                ("currency", [{"input": "France?", "target": "Euro"}, {"input": "Japan?", "target": "Yen"}]),
            ]
        )
    ]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(tasks))
    out = tmp_path / "run"
    common = ["--tiny", "--tasks-json", str(path), "--out", str(out), "--contrast", "1.0", "--tasks-per-step", "2"]
    common += ["--latent-dim", "32", "--save-every", "1"]
    train_t2l.main([*common, "--steps", "2"])
    train_t2l.main([*common, "--steps", "3"])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all("ce_gap" in r for r in log)
    assert ckpt.load(out / "checkpoint").config.kind == "t2l"


def test_fitted_adapter_starts_at_the_base_model_and_the_fit_lowers_the_kl():
    """The oracle probe's per-passage adapter: zero delta before fitting, then distillation works."""
    from hyperlora_integrations.training.library import FittedAdapter

    torch.manual_seed(0)
    model = make_tiny_model(seed=1)
    qas = [("Who founded the observatory?", "Ilse Tramweg."), ("When?", "In 2031.")]
    fit = FittedAdapter(model.internalize(DOC))
    assert all(float(b.abs().max()) == 0.0 for b in fit.adapter().B.values())
    assert model.score_detailed(*qas[0], [fit.adapter()]) == pytest.approx(model.score_detailed(*qas[0]))
    kls = _distill_kls(model, fit, qas, steps=30, lr=1e-2)
    assert sum(kls[-5:]) / 5 < 0.7 * sum(kls[:5]) / 5


def test_fitted_adapter_serves_a_batch_of_task_rows():
    """The T2L oracle probe fits one adapter shared by every row of an SFT batch."""
    from hyperlora_integrations.training.library import FittedAdapter

    torch.manual_seed(0)
    model = make_tiny_model(seed=2)
    fit = FittedAdapter(model.generate_skill("Answer with the capital city."))
    A, B = fit(torch.zeros(3, 1))
    assert all(a.shape[0] == 3 and torch.equal(a[0], a[2]) for a in A.values())
    examples = [Example("France?", "Paris"), Example("Italy?", "Rome")]
    losses = _sft_losses(model, fit, torch.zeros(2, 1), examples, steps=30)
    assert losses[-1] < losses[0] - 0.3
