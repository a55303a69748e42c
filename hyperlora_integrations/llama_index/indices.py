"""``InternalizedIndex``: the ``VectorStoreIndex`` entry points over internalized documents.

``VectorStoreIndex.from_documents(docs)`` embeds text and later stuffs the top chunks into the
prompt. ``InternalizedIndex.from_documents(docs, model=model)`` turns each document into a
LoRA adapter (one Doc-to-LoRA pass per chunk, no gradients) and later puts a signed reference in
the prompt; the ``HyperLoRALLM`` activates the referenced adapters. The query engine it builds
is LlamaIndex's own ``RetrieverQueryEngine`` with its default response synthesizer.
"""

from __future__ import annotations

from collections.abc import Sequence
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

from ..adapters import AdapterStore, InternalizedCorpus  # noqa: E402
from ..errors import InvalidInputError  # noqa: E402
from ..model import HyperLoRAModel  # noqa: E402
from .llms import HyperLoRALLM  # noqa: E402
from .retrievers import REF_DOC_ID_KEY, HyperLoRARetriever  # noqa: E402


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
    ) -> None:
        if not isinstance(corpus, InternalizedCorpus):
            raise InvalidInputError(f"corpus must be an InternalizedCorpus, got {type(corpus).__name__}")
        self.corpus = corpus
        self.transformations = list(transformations) if transformations else []
        self.callback_manager = callback_manager

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[Document],
        *,
        model: HyperLoRAModel,
        store: AdapterStore | None = None,
        namespace: str = "default",
        transformations: Sequence[TransformComponent] | None = None,
        callback_manager: CallbackManager | None = None,
        show_progress: bool = False,
    ) -> InternalizedIndex:
        """Internalize ``documents`` into ``store`` (a private temporary store if None).

        An existing store namespace is reopened with what it already holds, so a persistent
        store survives restarts without internalizing anything twice.
        """
        corpus = InternalizedCorpus(model, store, namespace=namespace)
        index = cls(corpus, transformations=transformations, callback_manager=callback_manager)
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
        metadatas = []
        for node in nodes:
            meta = dict(node.metadata)
            # A Document is its own source; a split node points at the Document it came from.
            ref_doc_id = node.ref_doc_id if node.ref_doc_id is not None else node.node_id
            meta[REF_DOC_ID_KEY] = ref_doc_id
            metadatas.append(meta)
        return self.corpus.add_texts(texts, metadatas)

    def insert(self, document: Document, **_: Any) -> list[str]:
        """Internalize one more document; returns the ids of the adapters that hold it."""
        if not isinstance(document, BaseNode):
            raise InvalidInputError(f"expected a LlamaIndex Document, got {type(document).__name__}")
        return self._add([document])

    def insert_nodes(self, nodes: Sequence[BaseNode], **_: Any) -> list[str]:
        """Internalize already-split nodes as they are (no transformations applied)."""
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

    # ------------------------------------------------------------------ reads
    def as_retriever(self, similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K, **_: Any) -> HyperLoRARetriever:
        """A retriever over this index; extra keyword arguments are ignored as VectorStoreIndex does."""
        return HyperLoRARetriever(
            self.corpus, similarity_top_k=similarity_top_k, callback_manager=self.callback_manager
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
        ``similarity_top_k`` goes to the retriever, everything else to
        ``RetrieverQueryEngine.from_args`` (``response_mode``, ``streaming``, templates, ...).
        """
        from llama_index.core.query_engine import RetrieverQueryEngine

        retriever = self.as_retriever(similarity_top_k=kwargs.pop("similarity_top_k", DEFAULT_SIMILARITY_TOP_K))
        return RetrieverQueryEngine.from_args(retriever, llm=self._resolve_llm(llm), **kwargs)
