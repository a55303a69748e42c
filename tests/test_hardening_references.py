"""Regression tests of issue #19 (hostile-input review) for references and the retriever:
one-pass stripping, the same id in two namespaces, malleable reference strings, and the
retriever's document-size limit. docs/reliability.md lists them with the guarantee each backs.
"""

from __future__ import annotations

import pytest
import torch

from hyperlora_integrations import chat
from hyperlora_integrations.adapters import ReferenceResolver
from hyperlora_integrations.adapters.references import LOOSE_RE, REF_RE, strip_references
from hyperlora_integrations.adapters.store import store_signer
from hyperlora_integrations.errors import DocumentTooLargeError
from hyperlora_integrations.lora import Adapter, AdapterMetadata


def fitting_adapter(model, adapter_id: str, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = model.injector.shapes["down_proj"]
    n = model.injector.num_layers
    return Adapter(
        {"down_proj": torch.randn(n, 4, d_in, generator=g) * 0.1},
        {"down_proj": torch.randn(n, d_out, 4, generator=g) * 0.1},
        metadata=AdapterMetadata(
            id=adapter_id, kind="document", base_model=model.name, base_fingerprint=model.fingerprint
        ),
    )


def nested(ref: str, depth: int = 1) -> str:
    """The review's construction: a marker inserted inside a reference, ``depth`` times over."""
    for _ in range(depth):
        ref = ref[:5] + "[hyperlora-ref]" + ref[5:]
    return ref


def no_reference_left(text: str) -> bool:
    return not REF_RE.search(text) and not LOOSE_RE.search(text)


# ---------------------------------------------------------------------- 8. stripping is complete
@pytest.mark.parametrize("depth", [1, 2, 7, 60])
def test_stripping_leaves_no_reference_however_nested(store, depth):
    signer = store_signer(store)
    ref = signer.issue("tenant", "doc")
    text = f"before {nested(ref, depth)} after"
    clean, count = strip_references(text)
    assert no_reference_left(clean) and count >= 1 and clean.startswith("before ") and clean.endswith(" after")
    clean, valid, rejected = signer.extract(text, {"tenant"})
    assert no_reference_left(clean) and valid == [] and rejected >= 1
    res = ReferenceResolver(store, namespaces=["tenant"]).resolve_text(text)
    assert no_reference_left(res.messages[0]["content"]) and res.adapters == [] and res.rejected >= 1


def test_plain_stripping_is_unchanged(store):
    ref = store_signer(store).issue("tenant", "doc")
    assert strip_references(f"a {ref} b [hyperlora-ref junk] c") == ("a  b  c", 2)
    assert strip_references("no references") == ("no references", 0)


def test_chat_model_without_a_store_strips_nested_references(tiny_model, store, monkeypatch):
    from hyperlora_integrations.langchain import ChatHyperLoRA

    prompts = []
    original = tiny_model.stream_chunks

    def record(messages, adapters=(), **kwargs):
        prompts.append(" ".join(m["content"] for m in messages))
        return original(messages, adapters, **kwargs)

    monkeypatch.setattr(tiny_model, "stream_chunks", record)
    ref = store_signer(store).issue("tenant", "doc")
    msg = ChatHyperLoRA(model=tiny_model, max_tokens=2).invoke(f"hello {nested(ref, 3)}")
    assert prompts and no_reference_left(prompts[-1]) and "hello" in prompts[-1]
    assert msg.response_metadata["references_rejected"] >= 1


# ---------------------------------------------------------------------- 9. one id, two namespaces
def test_same_id_in_two_namespaces_applies_both_and_labels_each(tiny_model, store, monkeypatch):
    from hyperlora_integrations.langchain import ChatHyperLoRA

    store.put(fitting_adapter(tiny_model, "same", seed=1), namespace="alpha")
    store.put(fitting_adapter(tiny_model, "same", seed=2), namespace="beta")
    signer = store_signer(store)
    prompt = f"{signer.issue('alpha', 'same')} {signer.issue('beta', 'same')} What is it?"

    res = ReferenceResolver(store, namespaces=["alpha", "beta"]).resolve_text(prompt)
    assert len(res.adapters) == 2 and not torch.equal(res.adapters[0].A["down_proj"], res.adapters[1].A["down_proj"])
    assert [r.namespace for r in res.adapter_references] == ["alpha", "beta"]
    assert set(res.served) == {("alpha", "same"), ("beta", "same")}
    assert set(res.served_by) == {"alpha/same", "beta/same"}

    applied = []
    original = tiny_model.stream_chunks

    def record(messages, adapters=(), **kwargs):
        applied.append(list(adapters))
        return original(messages, adapters, **kwargs)

    monkeypatch.setattr(tiny_model, "stream_chunks", record)
    # Selection off: this checks that both namespaces' adapters reach the call (routing is test_routing.py's).
    llm = ChatHyperLoRA(
        model=tiny_model,
        adapter_store=store,
        reference_namespaces=["alpha", "beta"],
        max_tokens=2,
        select_adapters=False,
    )
    meta = llm.invoke(prompt).response_metadata
    weights = [a.A["down_proj"] for a in applied[-1]]
    assert len(weights) == 2 and not torch.equal(weights[0], weights[1])  # both namespaces' weights
    expected = {"alpha": store.get("same", namespace="alpha"), "beta": store.get("same", namespace="beta")}
    for entry, adapter in zip(meta["adapters"], applied[-1], strict=True):
        assert torch.equal(adapter.A["down_proj"], expected[entry["namespace"]].A["down_proj"])
    assert sorted(a["namespace"] for a in meta["adapters"]) == ["alpha", "beta"]
    assert set(meta["served_by"]) == {"alpha/same", "beta/same"}


def test_single_namespace_served_by_keys_stay_plain_ids(tiny_model, store):
    store.put(fitting_adapter(tiny_model, "doc", seed=1), namespace="alpha")
    ref = store_signer(store).issue("alpha", "doc")
    res = ReferenceResolver(store).resolve_text(f"{ref} {ref}")
    assert list(res.served_by) == ["doc"] and len(res.adapters) == 1


# ---------------------------------------------------------------------- 11. one spelling per reference
def _variants(ref: str) -> list[str]:
    head, rest = ref.split(" t=")
    digits, tail = rest.split(" ", 1)
    arabic = "".join(chr(0x0660 + int(c)) for c in digits)
    fullwidth = "".join(chr(0xFF10 + int(c)) for c in digits)
    return [f"{head} t=0{digits} {tail}", f"{head} t=00{digits} {tail}", f"{head} t={arabic} {tail}"] + [
        f"{head} t={fullwidth} {tail}"
    ]


def test_altered_time_digits_do_not_verify(tiny_model, store):
    store.put(fitting_adapter(tiny_model, "doc", seed=1), namespace="alpha")
    signer = store_signer(store)
    ref = signer.issue("alpha", "doc")
    resolver = ReferenceResolver(store, namespaces=["alpha"])
    assert len(resolver.resolve_text(ref).adapters) == 1  # the original still works
    for variant in _variants(ref):
        clean, valid, rejected = signer.extract(variant, {"alpha"})
        assert valid == [] and rejected == 1 and "hyperlora-ref" not in clean, variant
        res = resolver.resolve_text(f"q {variant}")
        assert res.adapters == [] and res.rejected == 1 and "hyperlora-ref" not in res.messages[0]["content"]


# ---------------------------------------------------------------------- 5. retriever size limit
def test_retriever_refuses_an_oversized_document_before_tokenizing(tiny_model, store, monkeypatch):
    from langchain_core.documents import Document

    from hyperlora_integrations.langchain import HyperLoRARetriever

    retriever = HyperLoRARetriever(model=tiny_model, store=store)
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("tokenized a document that should have been refused first")

    monkeypatch.setattr(chat, "_encode", refuse)
    monkeypatch.setattr(tiny_model, "count_tokens", refuse)
    doc = "All work and no play makes Jack a dull boy. " * 240_000  # 10.6 MB
    with pytest.raises(DocumentTooLargeError):
        retriever.add_documents([Document(page_content=doc)])
    assert calls == [] and len(retriever) == 0 and store.jobs() == []
