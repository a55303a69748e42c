"""Consolidation on fictional documents (``hyperlora eval fictional``).

The fixture (``bench/fixtures/fictional_docs.json``) holds short documents written for this
project with facts no model can know, three short-answer questions each; its ``test`` split is
never trained or tuned on. Per question: gold-answer NLL per token and whether the greedy answer
contains the gold answer, under

- ``none``: no document;  ``context``: the document in the prompt;
- ``instant``: the one-pass hypernetwork adapter (when the model has one);
- ``consolidated``: ``HyperLoRAModel.consolidate`` of the document (no question is seen);
- ``mismatched``: the next document's consolidated adapter -- the control a generic "answer
  like you read something" effect also passes; only the own document's content fails it.

Intervals: 95 % bootstrap over documents (questions of one document are not independent).
Consolidated adapters are cached under ``--cache`` (resume after a kill, rescoring for free).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..consolidation import ConsolidationConfig
from ..lora import Adapter
from ..metrics import bootstrap, mean
from ..model import HyperLoRAModel

FIXTURE = Path(__file__).resolve().parent.parent / "bench" / "fixtures" / "fictional_docs.json"
CONDITIONS = ("none", "context", "instant", "consolidated", "mismatched")


def load_fixture(split: str = "test", path: Path = FIXTURE) -> list[dict]:
    data = json.loads(Path(path).read_text())
    wanted = set(data["splits"][split]) if split != "all" else {d["id"] for d in data["documents"]}
    return [d for d in data["documents"] if d["id"] in wanted]


def _cached_consolidate(model: HyperLoRAModel, doc: dict, config: ConsolidationConfig, cache: Path | None, seed: int):
    key = hashlib.sha256(f"{model.fingerprint}|{config.model_dump_json()}|{seed}|{doc['text']}".encode()).hexdigest()
    path = cache / f"{doc['id']}-{key[:16]}.safetensors" if cache else None
    if path is not None and path.exists():
        return Adapter.load(path)
    adapter = model.consolidate(doc["text"], config=config, seed=seed, progress=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(adapter.to_bytes())
        tmp.replace(path)  # atomic: a kill never leaves a half-written adapter to resume from
    return adapter


def _contains(answer: str, output: str) -> bool:
    return answer.lower() in output.lower()


def evaluate(
    model: HyperLoRAModel,
    docs: list[dict],
    config: ConsolidationConfig,
    *,
    generate: bool = True,
    max_new_tokens: int = 24,
    cache: Path | None = None,
    seed: int = 0,
    generate_conditions: tuple[str, ...] | None = None,
) -> dict:
    """Score every question under every condition; returns per-question rows and a summary.

    ``generate_conditions`` limits greedy answering (the slow part) to those conditions.
    """
    consolidated, seconds = [], []
    for doc in tqdm(docs, desc="consolidating", unit="doc"):
        start = time.perf_counter()
        adapter = _cached_consolidate(model, doc, config, cache, seed)
        consolidated.append(adapter)
        seconds.append(
            adapter.metadata.model_extra.get("consolidation", {}).get("seconds", time.perf_counter() - start)
        )
    rows = []
    for i, doc in enumerate(tqdm(docs, desc="scoring", unit="doc")):
        conditions: dict[str, dict] = {"none": {}, "context": {"context": doc["text"]}}
        if model.d2l is not None:
            conditions["instant"] = {"adapters": [model.internalize(doc["text"], progress=False)]}
        conditions["consolidated"] = {"adapters": [consolidated[i]]}
        conditions["mismatched"] = {"adapters": [consolidated[(i + 1) % len(docs)]]}
        for q in doc["questions"]:
            row = {"doc": doc["id"], "question": q["question"], "answer": q["answer"]}
            for name, kwargs in conditions.items():
                nll, n = model.score_detailed(q["question"], q["answer"], **kwargs)
                row[f"nll_{name}"] = nll / n
                wanted = generate_conditions is None or name in generate_conditions
                if generate and name != "mismatched" and wanted:
                    out = model.generate(q["question"], max_new_tokens=max_new_tokens, **kwargs)
                    row[f"out_{name}"] = out
                    row[f"hit_{name}"] = float(_contains(q["answer"], out))
            rows.append(row)
    return {
        "rows": rows,
        "summary": summarize(rows, docs),
        "consolidation_seconds": seconds,
        "adapters": consolidated,
    }


def retrieval_study(
    model: HyperLoRAModel,
    docs: list[dict],
    consolidated: list[Adapter],
    *,
    cutoffs: tuple[float, ...] = (0.5,),
    max_new_tokens: int = 24,
) -> dict:
    """The retriever's k with consolidated adapters: k=1, k=4, and k=4 with relative score cutoffs.

    All documents of the split form one BM25 corpus; each question activates the adapters of the
    documents retrieved for it (as ``HyperLoRARetriever`` + ``ChatHyperLoRA`` do), so with k=4
    up to three unrelated adapters are active next to the right one.
    """
    from ..adapters.corpus import relative_cutoff
    from ..adapters.retrieval import BM25Index

    index = BM25Index()
    for i, doc in enumerate(docs):
        index.add(str(i), doc["text"])
    settings = {"k1": (1, None), "k4": (4, None), **{f"k4_cut{c}": (4, c) for c in cutoffs}}
    rows = []
    for i, doc in enumerate(tqdm(docs, desc="retrieval study", unit="doc")):
        for q in doc["questions"]:
            row = {"doc": doc["id"], "answer": q["answer"]}
            for name, (k, cutoff) in settings.items():
                hits = [_Scored(int(j), s) for j, s in index.search(q["question"], k)]
                hits = [h for h in hits if h.score > 0]
                hits = relative_cutoff(hits, cutoff)
                adapters = [consolidated[h.index] for h in hits]
                nll, n = model.score_detailed(q["question"], q["answer"], adapters)
                out = model.generate(q["question"], adapters, max_new_tokens=max_new_tokens)
                row[f"nll_{name}"] = nll / n
                row[f"hit_{name}"] = float(_contains(q["answer"], out))
                row[f"active_{name}"] = len(adapters)
                row[f"right_{name}"] = float(i in [h.index for h in hits])
            rows.append(row)
    summary = {}
    for name in settings:
        summary[name] = {
            "answers_containing_gold": f"{int(sum(r[f'hit_{name}'] for r in rows))}/{len(rows)}",
            "mean_active_adapters": mean([r[f"active_{name}"] for r in rows]),
            "right_document_active": mean([r[f"right_{name}"] for r in rows]),
            "nll": mean([r[f"nll_{name}"] for r in rows]),
        }
    for name in settings:
        if name != "k1":
            diff = [r[f"hit_{name}"] - r["hit_k1"] for r in rows]
            summary[name]["hits_minus_k1"] = bootstrap([diff], mean)
    return {"rows": rows, "summary": summary}


def swap_study(
    model: HyperLoRAModel,
    docs: list[dict],
    consolidated: list[Adapter],
    *,
    max_new_tokens: int = 24,
    k: int | None = None,
) -> dict:
    """The two-line swaps as users write them, answering every question of ``docs``.

    LangChain: one LCEL chain (prompt -> chat model -> parser) with the context from (a) nothing
    (the bare model) or (b) ``HyperLoRARetriever(consolidate="now")`` next to ``ChatHyperLoRA`` on
    the same model, no other argument. LlamaIndex: ``InternalizedIndex(consolidate="now")
    .as_query_engine(llm=HyperLoRALLM(model))``. The store is seeded with the adapters this run
    consolidated (the same ``consolidate`` call the retriever would make), so nothing is trained
    twice. Reported: answers containing the gold answer, and how each reference was served
    ("context" would mean document text reached the prompt). ``k``: documents retrieved per
    question (``k`` of the retriever, ``similarity_top_k`` of the index); None keeps each
    framework's default.
    """
    from langchain_core.documents import Document as LCDocument
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from llama_index.core import Document as LIDocument

    from ..adapters import AdapterStore
    from ..adapters.corpus import document_id
    from ..langchain import ChatHyperLoRA, HyperLoRARetriever
    from ..llama_index import HyperLoRALLM, InternalizedIndex

    store = AdapterStore()
    for namespace in ("langchain", "llamaindex"):
        for doc, adapter in zip(docs, consolidated, strict=True):
            copy = Adapter(adapter.A, adapter.B, scaling=adapter.scaling, metadata=adapter.metadata.model_copy())
            copy.metadata.id = document_id(namespace, doc["text"])
            store.put(copy, namespace=namespace, text=doc["text"])
    retriever = HyperLoRARetriever.from_documents(
        [LCDocument(page_content=d["text"]) for d in docs],
        model=model,
        store=store,
        namespace="langchain",
        consolidate="now",
        **({} if k is None else {"k": k}),
    )
    chat = ChatHyperLoRA(model=model, max_tokens=max_new_tokens, references_from=[retriever])
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer the question using the context.\n\nContext:\n{context}"), ("human", "{question}")]
    )

    def fmt(found) -> str:
        return "\n\n".join(d.page_content for d in found)

    bare = {"context": lambda _: "", "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()
    swapped_llm = {"context": retriever | fmt, "question": RunnablePassthrough()} | prompt | chat
    index = InternalizedIndex.from_documents(
        [LIDocument(text=d["text"]) for d in docs],
        model=model,
        store=store,
        namespace="llamaindex",
        consolidate="now",
    )
    engine = index.as_query_engine(
        llm=HyperLoRALLM(model, store=store, max_new_tokens=max_new_tokens),
        **({} if k is None else {"similarity_top_k": k}),
    )
    rows = []
    served: dict[str, int] = {}
    for doc in tqdm(docs, desc="swap study", unit="doc"):
        for q in doc["questions"]:
            msg = swapped_llm.invoke(q["question"])
            for how in msg.response_metadata.get("served_by", {}).values():
                served[how] = served.get(how, 0) + 1
            answer_li = str(engine.query(q["question"]))
            rows.append(
                {
                    "doc": doc["id"],
                    "hit_bare": float(_contains(q["answer"], bare.invoke(q["question"]))),
                    "hit_langchain": float(_contains(q["answer"], msg.content)),
                    "hit_llamaindex": float(_contains(q["answer"], answer_li)),
                }
            )
    summary = {k: f"{int(sum(r[f'hit_{k}'] for r in rows))}/{len(rows)}" for k in ("bare", "langchain", "llamaindex")}
    for k in ("langchain", "llamaindex"):
        summary[f"{k}_minus_bare"] = bootstrap([[r[f"hit_{k}"] - r["hit_bare"] for r in rows]], mean)
    summary["langchain_served_by"] = served
    return {"rows": rows, "summary": summary}


class _Scored:
    def __init__(self, index: int, score: float) -> None:
        self.index, self.score = index, score


def summarize(rows: list[dict], docs: list[dict]) -> dict:
    """Gap closure, own-vs-other wins and answer rates, with document-level bootstrap intervals."""
    names = [c for c in CONDITIONS if f"nll_{c}" in rows[0]]
    by_doc = {d["id"]: [r for r in rows if r["doc"] == d["id"]] for d in docs}
    by_doc = {k: v for k, v in by_doc.items() if v}
    cols = {c: [mean([r[f"nll_{c}"] for r in rs]) for rs in by_doc.values()] for c in names}

    def closure(cond: str):
        return lambda a, b, c: (mean(a) - mean(c)) / (mean(a) - mean(b)) if abs(mean(a) - mean(b)) > 1e-9 else None

    summary: dict = {"documents": len(by_doc), "questions": len(rows)}
    summary["nll"] = {c: mean(cols[c]) for c in names}
    summary["gap_closure"] = {
        c: bootstrap([cols["none"], cols["context"], cols[c]], closure(c)) for c in names if c not in ("none",)
    }
    wins = [[float(r["nll_consolidated"] < r["nll_mismatched"]) for r in rs] for rs in by_doc.values()]
    summary["own_beats_other"] = bootstrap([[mean(w) for w in wins]], mean)
    summary["own_beats_other_count"] = f"{int(sum(map(sum, wins)))}/{len(rows)}"
    if any(k.startswith("hit_") for k in rows[0]):
        hits = {c: [[r[f"hit_{c}"] for r in rs] for rs in by_doc.values()] for c in names if f"hit_{c}" in rows[0]}
        summary["answers_containing_gold"] = {c: f"{int(sum(map(sum, h)))}/{len(rows)}" for c, h in hits.items()}
        summary["answer_rate"] = {c: bootstrap([[mean(x) for x in h]], mean) for c, h in hits.items()}
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hyperlora eval fictional", description=__doc__.split("\n")[0])
    p.add_argument("--split", default="test", choices=["dev", "test", "all"])
    p.add_argument("--limit", type=int, default=None, help="first N documents only")
    p.add_argument("--base-model", default=None, help="HF id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--layers", default=None, help="train only the top N layers ('all': every layer)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--objective", default=None, help="kind weights, e.g. recite=1,continuation=1,fact=0.5,cloze=1")
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--retrieval", action="store_true", help="also run the k=1 / k=4 / cutoff retrieval study")
    p.add_argument("--swap", action="store_true", help="also run the LangChain / LlamaIndex swap study")
    p.add_argument("--studies", default="main", help="comma-separated: main, retrieval, swap (default main)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument(
        "--cutoffs", default="0.5", help="retrieval study: relative score cutoffs to try with k=4, e.g. 0.5,0.7"
    )
    p.add_argument(
        "--generate-conditions", default=None, help="answer greedily only under these, e.g. none,context,consolidated"
    )
    p.add_argument(
        "--consolidate-only",
        default=None,
        metavar="I/N",
        help="only fill the cache with shard I of N of the documents (run N of these in parallel, then score)",
    )
    p.add_argument(
        "--swap-k", type=int, default=None, help="swap study: documents per question (default: each framework's)"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default="runs/consolidated-cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval_fictional.json")
    return p.parse_args(argv)


def config_from_args(args) -> ConsolidationConfig:
    update: dict = {}
    if args.steps is not None:
        update["steps"] = args.steps
    if args.layers is not None:
        update["layers"] = None if args.layers == "all" else int(args.layers)
    if args.lr is not None:
        update["lr"] = args.lr
    if args.objective:
        for part in args.objective.split(","):
            key, value = part.split("=")
            update[key.strip()] = float(value)
    return ConsolidationConfig(**update)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    model = HyperLoRAModel.from_pretrained(args.base_model)
    docs = load_fixture(args.split)[: args.limit]
    if args.consolidate_only:
        i, n = (int(x) for x in args.consolidate_only.split("/"))
        for doc in tqdm(docs[i::n], desc=f"consolidating shard {i}/{n}", unit="doc"):
            _cached_consolidate(model, doc, config, Path(args.cache), args.seed)
        return {}
    studies = set(args.studies.split(","))
    unknown = studies - {"main", "retrieval", "swap"}
    if unknown:
        raise SystemExit(f"unknown studies {sorted(unknown)}: choose from main, retrieval, swap")
    if args.retrieval:
        studies.add("retrieval")
    if args.swap:
        studies.add("swap")
    if "main" in studies:
        result = evaluate(
            model,
            docs,
            config,
            generate=not args.no_generate,
            max_new_tokens=args.max_new_tokens,
            cache=Path(args.cache),
            seed=args.seed,
            generate_conditions=tuple(args.generate_conditions.split(",")) if args.generate_conditions else None,
        )
        adapters = result.pop("adapters")
    else:  # the adapters only, from the cache (or consolidated now)
        result = {}
        adapters = [
            _cached_consolidate(model, doc, config, Path(args.cache), args.seed)
            for doc in tqdm(docs, desc="consolidating", unit="doc")
        ]
    if "retrieval" in studies:
        cutoffs = tuple(float(c) for c in args.cutoffs.split(","))
        result["retrieval"] = retrieval_study(
            model, docs, adapters, cutoffs=cutoffs, max_new_tokens=args.max_new_tokens
        )
        print(json.dumps(result["retrieval"]["summary"], indent=1))
    if "swap" in studies:
        result["swap"] = swap_study(model, docs, adapters, max_new_tokens=args.max_new_tokens, k=args.swap_k)
        print(json.dumps(result["swap"]["summary"], indent=1))
    result["config"] = config.model_dump(mode="json")
    result["split"] = args.split
    result["base_model"] = model.name
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["command"] = "hyperlora eval fictional " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps(result, indent=1))
    if "summary" in result:
        print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
