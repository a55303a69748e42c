"""``InternalizedIndex``: the ``VectorStoreIndex`` entry points over internalized documents.

``VectorStoreIndex.from_documents(docs)`` embeds text and later stuffs the top chunks into the
prompt. ``InternalizedIndex.from_documents(docs, model=model)`` turns each document into a
LoRA adapter (one Doc-to-LoRA pass per chunk, no gradients) and later puts a signed reference in
the prompt; the ``HyperLoRALLM`` activates the referenced adapters. The query engine it builds
is LlamaIndex's own ``RetrieverQueryEngine`` with its default response synthesizer.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._optional import require

require("llama_index.core", "llamaindex")

from llama_index.core.base.base_query_engine import BaseQueryEngine  # noqa: E402
from llama_index.core.callbacks import CallbackManager  # noqa: E402
from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K  # noqa: E402
from llama_index.core.ingestion import run_transformations  # noqa: E402
from llama_index.core.llms import LLM  # noqa: E402
from llama_index.core.schema import BaseNode, Document, MetadataMode, TransformComponent  # noqa: E402
from llama_index.core.settings import Settings  # noqa: E402
from llama_index.core.vector_stores.types import MetadataFilters  # noqa: E402

from .._arguments import unexpected  # noqa: E402
from ..adapters import AdapterStore, InternalizedCorpus  # noqa: E402
from ..adapters.corpus import _consolidate_mode  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402
from ..model import HyperLoRAModel  # noqa: E402
from .llms import HyperLoRALLM  # noqa: E402
from .retrievers import DOC_HASH_KEY, REF_DOC_ID_KEY, HyperLoRARetriever  # noqa: E402

# VectorStoreIndex arguments with no meaning for adapters: accepted so that only the class name
# changes in a swap, and ignored (documented in docs/llamaindex.md). Anything else raises.
_INDEX_IGNORED = ("embed_model", "use_async", "store_nodes_override", "insert_batch_size", "objects", "index_struct")
# VectorIndexRetriever arguments that only mean something to embeddings.
_RETRIEVER_IGNORED = (
    "vector_store_query_mode",
    "alpha",
    "sparse_top_k",
    "hybrid_top_k",
    "embed_model",
    "object_map",
    "vector_store_kwargs",
    "verbose",
)


def check_vector_index_kwargs(owner: str, kwargs: dict[str, Any], ignored: Sequence[str]) -> None:
    """Accept (and ignore) the vector-only arguments ``ignored``; refuse any other keyword."""
    unknown = [key for key in kwargs if key not in ignored]
    if unknown:
        raise unexpected(owner, unknown, ["model", "store", "namespace", "transformations", *ignored])


def _check_signature(owner: str, function: Any, kwargs: dict[str, Any], also: Any = ()) -> None:
    """Refuse keywords ``function`` would swallow into its ``**kwargs`` and ignore.

    LlamaIndex's ``from_args``/``from_defaults`` accept any keyword and drop the unknown ones,
    so ``as_query_engine(simlarity_top_k=2)`` would silently retrieve the default number.
    """
    import inspect

    params = inspect.signature(function).parameters
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = [key for key in kwargs if key not in named]
    if unknown:
        retriever = ["similarity_top_k", "filters", "doc_ids", "node_ids", "min_score"]
        raise unexpected(owner, unknown, [*named, *retriever, *also])


def _default_model(model: Any) -> HyperLoRAModel:
    """``model=`` as given, else the model of ``Settings.llm`` when that is a ``HyperLoRALLM``."""
    if model is None:
        configured = getattr(Settings, "_llm", None)  # the public Settings.llm would build OpenAI's
        if isinstance(configured, HyperLoRALLM):
            return configured.hyperlora_model
        raise InvalidInputError(
            "InternalizedIndex needs a model: pass model=HyperLoRAModel..., or set "
            "Settings.llm = HyperLoRALLM(model) first"
        )
    if not isinstance(model, HyperLoRAModel):
        raise InvalidInputError(f"model must be a HyperLoRAModel, got {type(model).__name__}")
    return model


class AdapterStorageContext:
    """What ``index.storage_context`` gives: the ``AdapterStore`` the index writes through to.

    A ``VectorStoreIndex`` is persisted with ``index.storage_context.persist(persist_dir)``; an
    ``InternalizedIndex`` is persisted as it is built, in its store. ``persist()`` (or with the
    store's own directory) is therefore a no-op; another directory raises, because copying a
    temporary store would not make the next run find it: build with ``store=AdapterStore(dir)``.
    """

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def persist(self, persist_dir: str | os.PathLike | None = None, **_: Any) -> None:
        if persist_dir is None or Path(persist_dir).resolve() == self.store.path.resolve():
            return
        raise InvalidInputError(
            f"this index's adapters live in the store at {self.store.path}; to keep them in {persist_dir}, "
            f"build the index with store=AdapterStore({str(persist_dir)!r}) (it is written as it is built)"
        )


class InternalizedIndex:
    """Documents internalized into adapters in one namespace of an ``AdapterStore``.

    Each document becomes one adapter by default (Doc-to-LoRA chunks long documents itself and
    concatenates the chunk adapters). Pass ``transformations`` (e.g. ``[SentenceSplitter()]``)
    to internalize each resulting node separately, which makes retrieval finer-grained.
    Re-adding a document with the same text reuses its adapter instead of internalizing again.
    """

    def __init__(
        self,
        corpus: InternalizedCorpus,
        *,
        transformations: Sequence[TransformComponent] | None = None,
        callback_manager: CallbackManager | None = None,
        consolidate: str | bool = "background",
    ) -> None:
        if not isinstance(corpus, InternalizedCorpus):
            raise InvalidInputError(f"corpus must be an InternalizedCorpus, got {type(corpus).__name__}")
        _consolidate_mode(consolidate)  # validates
        self.consolidate = consolidate
        self.corpus = corpus
        self.transformations = list(transformations) if transformations else []
        self.callback_manager = callback_manager

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[Document],
        storage_context: Any = None,
        show_progress: bool = False,
        callback_manager: CallbackManager | None = None,
        transformations: Sequence[TransformComponent] | None = None,
        *,
        model: HyperLoRAModel | None = None,
        store: AdapterStore | None = None,
        namespace: str | None = None,
        consolidate: str | bool = "background",
        **kwargs: Any,
    ) -> InternalizedIndex:
        """Internalize ``documents`` into ``store`` (the model's shared private store if None).

        ``consolidate`` learns each document into its adapter by gradient steps: ``"background"``
        (default: the instant adapter now, consolidation queued; the LLM serves the text until
        then), ``"now"`` (blocks until consolidated, with ``show_progress``), ``False`` (instant
        adapter only). Without ``store``, indexes share the model's private store (so a
        ``HyperLoRALLM`` on the same model honours their references) in a namespace of their own.

        An existing store namespace is reopened with what it already holds, so a persistent
        store survives restarts without internalizing anything twice. ``model`` defaults to the
        model of ``Settings.llm`` when that is a ``HyperLoRALLM``. ``VectorStoreIndex``
        arguments that have no meaning here (``storage_context``, ``embed_model``, ``use_async``,
        ...) are accepted and ignored, so only the class name changes; unknown ones raise.
        """
        check_vector_index_kwargs("InternalizedIndex.from_documents", kwargs, _INDEX_IGNORED)
        hm = _default_model(model)
        if store is None:
            store = hm.default_store
            namespace = namespace or f"index-{secrets.token_hex(4)}"
        corpus = InternalizedCorpus(hm, store, namespace=namespace or "default")
        index = cls(corpus, transformations=transformations, callback_manager=callback_manager, consolidate=consolidate)
        index._add(documents, show_progress=show_progress)
        return index

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> HyperLoRAModel:
        return self.corpus.model

    @property
    def store(self) -> AdapterStore:
        return self.corpus.store

    @property
    def namespace(self) -> str:
        return self.corpus.namespace

    def __len__(self) -> int:
        return len(self.corpus)

    # ------------------------------------------------------------------ writes
    def _nodes(self, documents: Sequence[BaseNode], show_progress: bool) -> list[BaseNode]:
        if isinstance(documents, BaseNode):
            raise InvalidInputError("pass a list of documents, not one document")
        for doc in documents:
            if not isinstance(doc, BaseNode):
                raise InvalidInputError(f"expected LlamaIndex Documents, got {type(doc).__name__}")
        if not self.transformations:
            return list(documents)
        return run_transformations(list(documents), self.transformations, show_progress=show_progress)

    def _add(self, documents: Sequence[BaseNode], *, show_progress: bool = False) -> list[str]:
        nodes = self._nodes(documents, show_progress)
        texts = [node.get_content(metadata_mode=MetadataMode.NONE) for node in nodes]
        hashes = {doc.node_id: doc.hash for doc in documents}
        metadatas = []
        for node in nodes:
            meta = dict(node.metadata)
            # A Document is its own source; a split node points at the Document it came from.
            ref_doc_id = node.ref_doc_id if node.ref_doc_id is not None else node.node_id
            meta[REF_DOC_ID_KEY] = ref_doc_id
            meta[DOC_HASH_KEY] = hashes.get(ref_doc_id, node.hash)  # what refresh_ref_docs compares
            metadatas.append(meta)
        return self.corpus.add_texts(
            texts, metadatas, consolidate=self.consolidate, progress=show_progress and self.consolidate == "now"
        )

    def insert(self, document: Document, **insert_kwargs: Any) -> list[str]:
        """Internalize one more document; returns the ids of the adapters that hold it."""
        if insert_kwargs:
            raise unexpected("InternalizedIndex.insert", insert_kwargs, ["document"])
        if not isinstance(document, BaseNode):
            raise InvalidInputError(f"expected a LlamaIndex Document, got {type(document).__name__}")
        return self._add([document])

    def insert_nodes(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> list[str]:
        """Internalize already-split nodes as they are (no transformations applied)."""
        if insert_kwargs:
            raise unexpected("InternalizedIndex.insert_nodes", insert_kwargs, ["nodes"])
        if isinstance(nodes, BaseNode):
            raise InvalidInputError("pass a list of nodes, not one node")
        saved, self.transformations = self.transformations, []
        try:
            return self._add(nodes)
        finally:
            self.transformations = saved

    def delete(self, adapter_ids: Sequence[str]) -> None:
        """Forget adapters (their ids are the ``node_id``s the retriever returns)."""
        self.corpus.delete(adapter_ids)

    def _adapters_of(self, ref_doc_id: str) -> list[str]:
        return [aid for aid, meta in list(self.corpus._meta.items()) if meta.get(REF_DOC_ID_KEY) == ref_doc_id]

    def delete_ref_doc(self, ref_doc_id: str, delete_from_docstore: bool = False, **delete_kwargs: Any) -> None:
        """Delete every adapter made from the ``Document`` ``ref_doc_id`` (as ``VectorStoreIndex`` does).

        ``delete_from_docstore`` is accepted for compatibility: there is no docstore, the
        adapters and their text live in the store and are removed together.
        """
        if delete_kwargs:
            raise unexpected("InternalizedIndex.delete_ref_doc", delete_kwargs, ["ref_doc_id", "delete_from_docstore"])
        if not isinstance(ref_doc_id, str):
            raise InvalidInputError(f"ref_doc_id must be a str, got {type(ref_doc_id).__name__}")
        self.corpus.delete(self._adapters_of(ref_doc_id))

    def refresh_ref_docs(self, documents: Sequence[Document], **update_kwargs: Any) -> list[bool]:
        """Insert new documents, re-internalize changed ones (by ``Document.hash``), skip the rest.

        Returns, per document, whether it was (re)internalized, as ``VectorStoreIndex`` does.
        """
        if update_kwargs:
            raise unexpected("InternalizedIndex.refresh_ref_docs", update_kwargs, ["documents"])
        if isinstance(documents, BaseNode):
            raise InvalidInputError("pass a list of documents, not one document")
        changed = []
        for doc in documents:
            if not isinstance(doc, BaseNode):
                raise InvalidInputError(f"expected LlamaIndex Documents, got {type(doc).__name__}")
            existing = self._adapters_of(doc.node_id)
            if existing and all(self.corpus._meta[a].get(DOC_HASH_KEY) == doc.hash for a in existing):
                changed.append(False)
                continue
            if existing:
                self.corpus.delete(existing)
            self._add([doc])
            changed.append(True)
        return changed

    @property
    def ref_doc_ids(self) -> list[str]:
        """Ids of the source ``Document``s this index holds adapters of."""
        return sorted({str(m[REF_DOC_ID_KEY]) for m in list(self.corpus._meta.values()) if REF_DOC_ID_KEY in m})

    @property
    def storage_context(self) -> AdapterStorageContext:
        """Where this index lives; ``storage_context.persist()`` as after a ``VectorStoreIndex``."""
        return AdapterStorageContext(self.store)

    # ------------------------------------------------------------------ reads
    def as_retriever(
        self,
        similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
        *,
        filters: MetadataFilters | None = None,
        doc_ids: Sequence[str] | None = None,
        node_ids: Sequence[str] | None = None,
        min_score: float | None = 0.0,
        relative_score_cutoff: float | None = 0.5,
        **kwargs: Any,
    ) -> HyperLoRARetriever:
        """A retriever over this index, taking ``VectorIndexRetriever``'s arguments.

        ``filters``, ``doc_ids`` and ``node_ids`` narrow the documents as in a vector index;
        vector-only arguments (``vector_store_query_mode``, ``alpha``, ``embed_model``, ...) are
        ignored; unknown ones raise ``TypeError``.
        """
        check_vector_index_kwargs("InternalizedIndex.as_retriever", kwargs, _RETRIEVER_IGNORED)
        return HyperLoRARetriever(
            self.corpus,
            similarity_top_k=similarity_top_k,
            filters=filters,
            doc_ids=doc_ids,
            node_ids=node_ids,
            min_score=min_score,
            relative_score_cutoff=relative_score_cutoff,
            callback_manager=self.callback_manager,
        )

    def _split_retriever_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        keys = {
            "similarity_top_k",
            "filters",
            "doc_ids",
            "node_ids",
            "min_score",
            "relative_score_cutoff",
            *_RETRIEVER_IGNORED,
        }
        retriever = {k: kwargs.pop(k) for k in list(kwargs) if k in keys}
        return retriever, kwargs

    def as_chat_engine(self, chat_mode: str = "best", llm: LLM | None = None, **kwargs: Any) -> Any:
        """A chat engine over this index, as ``VectorStoreIndex.as_chat_engine`` builds it.

        ``best`` is ``condense_plus_context`` (what LlamaIndex picks for an LLM without function
        calling); ``context``, ``condense_question`` and ``simple`` work as there. Retriever
        arguments (``similarity_top_k``, ``filters``, ...) go to ``as_retriever``, the rest to
        the chat engine's ``from_defaults``.
        """
        from llama_index.core.chat_engine import (
            CondensePlusContextChatEngine,
            CondenseQuestionChatEngine,
            ContextChatEngine,
            SimpleChatEngine,
        )

        mode = str(getattr(chat_mode, "value", chat_mode))
        llm = self._resolve_llm(llm)
        retriever_kwargs, kwargs = self._split_retriever_kwargs(dict(kwargs))
        engines = {
            "best": CondensePlusContextChatEngine,
            "condense_plus_context": CondensePlusContextChatEngine,
            "context": ContextChatEngine,
            "condense_question": CondenseQuestionChatEngine,
            "simple": SimpleChatEngine,
        }
        if mode in engines:
            _check_signature("InternalizedIndex.as_chat_engine", engines[mode].from_defaults, kwargs, retriever_kwargs)
        if mode in ("best", "condense_plus_context"):
            return CondensePlusContextChatEngine.from_defaults(
                retriever=self.as_retriever(**retriever_kwargs), llm=llm, **kwargs
            )
        if mode == "context":
            return ContextChatEngine.from_defaults(retriever=self.as_retriever(**retriever_kwargs), llm=llm, **kwargs)
        if mode == "condense_question":
            engine = self.as_query_engine(llm=llm, **retriever_kwargs)
            return CondenseQuestionChatEngine.from_defaults(query_engine=engine, llm=llm, **kwargs)
        if mode == "simple":
            return SimpleChatEngine.from_defaults(llm=llm, **kwargs)
        raise InvalidInputError(
            f"chat_mode {chat_mode!r}: use best, condense_plus_context, context, condense_question or simple "
            "(agent modes were removed from LlamaIndex; wrap index.as_query_engine() in a QueryEngineTool)"
        )

    def bound_llm(self, **kwargs: Any) -> HyperLoRALLM:
        """A ``HyperLoRALLM`` on this index's model allowed to activate exactly this namespace."""
        return HyperLoRALLM(self.model, store=self.store, namespaces=[self.namespace], **kwargs)

    def _resolve_llm(self, llm: LLM | None) -> HyperLoRALLM:
        if llm is None:
            # Read the private slot: the public ``Settings.llm`` would construct the OpenAI default.
            configured = getattr(Settings, "_llm", None)
            llm = configured if isinstance(configured, HyperLoRALLM) else self.bound_llm()
        if not isinstance(llm, HyperLoRALLM):
            raise InvalidInputError(
                f"{type(llm).__name__} cannot read this index's references; use a HyperLoRALLM "
                "(or omit llm= to get one bound to this index)"
            )
        model = llm.hyperlora_model
        if (model.name, model.fingerprint) != (self.model.name, self.model.fingerprint):
            raise InvalidInputError(
                f"the LLM runs {model.name} but this index's adapters were made for {self.model.name}"
            )
        if llm.accepts_references_from(self.store, self.namespace):
            return llm
        if llm.store is None:
            # An LLM configured without any store (e.g. the stuffing baseline's Settings.llm):
            # keep its settings and let it read this index's references.
            return llm.with_store(self.store, [self.namespace])
        raise InvalidInputError(
            f"the LLM would reject references to namespace {self.namespace!r} of store {self.store.path}: "
            "build it with HyperLoRALLM(model, store=index.store) and allow that namespace"
        )

    def as_query_engine(self, llm: LLM | None = None, **kwargs: Any) -> BaseQueryEngine:
        """``RetrieverQueryEngine`` over this index, as ``VectorStoreIndex.as_query_engine`` builds it.

        ``llm`` defaults to ``Settings.llm`` when that is a ``HyperLoRALLM``, else to one bound to
        this index; a ``HyperLoRALLM`` without a store gets a copy bound to this index's store.
        Any other LLM is refused: it would receive references as text and no adapters.
        Retriever arguments (``similarity_top_k``, ``filters``, ``doc_ids``, ...) go to
        ``as_retriever``, everything else to ``RetrieverQueryEngine.from_args``
        (``response_mode``, ``streaming``, templates, ...).
        """
        from llama_index.core.query_engine import RetrieverQueryEngine

        retriever_kwargs, kwargs = self._split_retriever_kwargs(dict(kwargs))
        _check_signature("InternalizedIndex.as_query_engine", RetrieverQueryEngine.from_args, kwargs, retriever_kwargs)
        retriever = self.as_retriever(**retriever_kwargs)
        return RetrieverQueryEngine.from_args(retriever, llm=self._resolve_llm(llm), **kwargs)
