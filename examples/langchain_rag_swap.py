"""Swap a LangChain LCEL RAG chain for an internalizing one: only the retriever and the llm change.

First the chain written the usual way: a vector store retriever feeds the retrieved documents'
text into the prompt, and the chat model reads it. Then the very same chain code with the
retriever swapped for ``HyperLoRARetriever`` (each document becomes a LoRA adapter once; the
retriever returns short signed references) and the llm for ``ChatHyperLoRA(references_from=...)``
(which strips the references and activates their adapters for that call). Both llms are
``ChatHyperLoRA`` on the same base model, so the difference in prompt tokens and latency is the
swap alone. Answers, prompt tokens and latency are printed per question.

The vector store's embedding is a hashed bag of words (offline, no model download): keyword
overlap, not semantics; the internalizing retriever ranks with BM25, also keyword-based.

    python examples/langchain_rag_swap.py          # default model with the shipped Doc-to-LoRA checkpoint
    python examples/langchain_rag_swap.py --tiny   # tiny random model: runs in seconds, answers meaningless (often '')
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import statistics
import time
from typing import Any

from _models import add_model_args, load_model
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from hyperlora_integrations.langchain import ChatHyperLoRA, HyperLoRARetriever

DOCUMENTS = [
    Document(
        page_content="The Zorblax lantern festival is held in the town of Quendor every ninth of March. "
        "Families float paper lanterns dyed with violet berry ink down the river Tesk.",
        metadata={"source": "Zorblax festival"},
    ),
    Document(
        page_content="The Brisk Otter ferry crosses Lake Amberlin twice a day, at seven in the morning and "
        "at five in the evening. A one-way ticket costs four copper marks.",
        metadata={"source": "Brisk Otter ferry"},
    ),
    Document(
        page_content="Mount Feldrach's observatory was founded by the astronomer Ilsa Varn in 1871. "
        "Its brass telescope is eleven metres long.",
        metadata={"source": "Feldrach observatory"},
    ),
    Document(
        page_content="Quendor's bakers make a honey bread called tesk loaf, baked in clay ovens and eaten "
        "with goat butter during the lantern festival.",
        metadata={"source": "Tesk loaf"},
    ),
]
QUESTIONS = [
    "On which day is the Zorblax lantern festival held?",
    "When does the Brisk Otter ferry leave?",
    "Who founded the observatory on Mount Feldrach?",
]
PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using the context. Be brief.\n\nContext:\n{context}"),
        ("human", "{question}"),
    ]
)


class HashEmbeddings(Embeddings):
    """Hashed bag-of-words vectors: offline and deterministic, for the baseline vector store."""

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim

    def _embed(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        for word in re.findall(r"\w+", text.lower()):
            vec[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._embed(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._embed(text)


class LastCall(BaseCallbackHandler):
    """Remembers the chat model's last response: its usage and metadata (StrOutputParser drops them)."""

    def __init__(self) -> None:
        self.message: Any = None

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.message = response.generations[0][0].message


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(doc.page_content for doc in docs)


def build_chain(retriever: Runnable, llm: Runnable) -> Runnable:
    """The usual LCEL RAG chain; the two pipelines below differ only in what is passed in."""
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | llm | StrOutputParser()


def run(name: str, chain: Runnable, retriever: Runnable) -> list[int]:
    prompt_tokens = []
    for question in QUESTIONS:
        seen = LastCall()
        start = time.perf_counter()
        answer = chain.invoke(question, config={"callbacks": [seen]})
        latency = time.perf_counter() - start
        message = seen.message
        tokens = message.usage_metadata["input_tokens"]
        prompt_tokens.append(tokens)
        sources = [d.metadata["source"] for d in retriever.invoke(question)]
        adapters = [a["source"] for a in message.response_metadata.get("adapters", [])]
        print(f"[{name}] Q: {question}")
        print(f"    A: {answer.strip()!r}")
        print(f"    prompt tokens {tokens}, latency {latency:.2f}s, sources {sources}, adapters {adapters}")
    print(f"{name}: mean prompt tokens {round(statistics.mean(prompt_tokens))}")
    return prompt_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--max-tokens", type=int, default=None, help="answer length (default 48, 8 with --tiny)")
    args = parser.parse_args(argv)
    model = load_model(args, need=("d2l",))
    max_tokens = args.max_tokens or (8 if args.tiny else 48)

    # The usual way: vector store retriever, document text stuffed into the prompt.
    vector_retriever = InMemoryVectorStore.from_documents(DOCUMENTS, HashEmbeddings()).as_retriever(
        search_kwargs={"k": 2}
    )
    plain_llm = ChatHyperLoRA(model=model, max_tokens=max_tokens)
    usual = run("usual", build_chain(vector_retriever, plain_llm), vector_retriever)

    # The swap: same chain code; documents are internalized once, prompts carry references.
    start = time.perf_counter()
    # consolidate="now": each document is learned into its adapter before the first question
    # (about 1-2 minutes per document on 2 CPU cores with the default model; the default,
    # "background", answers from the text until then).
    retriever = HyperLoRARetriever.from_documents(DOCUMENTS, model=model, search_kwargs={"k": 2}, consolidate="now")
    print(f"internalized {len(DOCUMENTS)} documents in {time.perf_counter() - start:.1f}s")
    llm = ChatHyperLoRA(model=model, max_tokens=max_tokens, references_from=[retriever])
    swapped = run("swapped", build_chain(retriever, llm), retriever)

    saved = 1 - statistics.mean(swapped) / statistics.mean(usual)
    print(f"prompt tokens saved by the swap: {saved:.0%}")


if __name__ == "__main__":
    main()
