"""Bulk internalization on Ray Data: ``hyperlora ingest CORPUS --store DIR``.

The corpus is read with Ray Data (text files are one document each; JSONL and parquet rows have a
``text`` column and optionally ``metadata``), documents already in the store are dropped before
any model work (so a killed run resumes where it stopped), and ``map_batches`` runs the
internalization on an actor pool: each actor loads the model once from a ``ModelSpec`` and turns a
batch of texts into adapter bytes.

Writes go through one process, the driver, as results stream back. The store's SQLite index is a
single-host, one-writer-at-a-time design (WAL + ``flock``); actors on other nodes cannot open it
safely (SQLite over a network file system is not safe), so they never touch the store. The driver
commits each adapter as it arrives, so a crash loses at most the batch in flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..adapters.corpus import document_id
from ..adapters.store import AdapterStore, check_name
from ..errors import InvalidInputError
from ..lora import Adapter, content_hash
from .spec import ModelSpec

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}


class IngestReport(BaseModel):
    """What one ``ingest`` run did; ``failed`` maps ids to the error of each document refused."""

    total: int
    skipped: int
    written: int
    failed: dict[str, str] = Field(default_factory=dict)
    nodes: list[str] = Field(default_factory=list)
    """Ray node ids whose actors internalized documents in this run."""
    seconds: float
    documents_per_second: float


def _files(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """Corpus files by reader; a directory contributes every file with a known suffix, recursively."""
    groups: dict[str, list[str]] = {"text": [], "json": [], "parquet": []}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InvalidInputError(f"corpus path {str(path)!r} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            suffix = f.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                groups["text"].append(str(f.resolve()))
            elif suffix in JSON_SUFFIXES:
                groups["json"].append(str(f.resolve()))
            elif suffix in PARQUET_SUFFIXES:
                groups["parquet"].append(str(f.resolve()))
            elif not path.is_dir():
                raise InvalidInputError(
                    f"{str(f)!r}: unknown corpus format; use .txt/.md (one document per file), "
                    ".jsonl (a 'text' field per line) or .parquet (a 'text' column)"
                )
    if not any(groups.values()):
        raise InvalidInputError(f"no corpus files (.txt, .md, .jsonl, .parquet) under {[str(p) for p in paths]}")
    return groups


def _row(text: Any, metadata: Any, source: str) -> dict[str, Any]:
    """Normalise one document; a bad one is kept with an ``error`` so it is reported, not dropped."""
    error = ""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            text, error = "", f"not UTF-8 ({exc.reason} at byte {exc.start})"
    if not isinstance(text, str):
        text, error = "", error or f"'text' must be a string, got {type(text).__name__}"
    elif not error and not text.strip():
        error = "empty or whitespace-only document"
    if not isinstance(metadata, dict):
        metadata = {} if metadata is None else {"metadata": metadata}
    metadata = {"source": source, **metadata}
    return {"text": text, "metadata": json.dumps(metadata, default=str), "source": source, "error": error}


def read_corpus(paths: Sequence[str | Path]):
    """A Ray Dataset of ``{text, metadata (JSON), source, error}`` rows from text, JSONL and parquet files."""
    import ray.data

    groups = _files(paths)
    parts = []
    if groups["text"]:
        ds = ray.data.read_binary_files(groups["text"], include_paths=True)
        parts.append(ds.map(lambda r: _row(r["bytes"], None, r["path"])))
    for kind in ("json", "parquet"):
        if not groups[kind]:
            continue
        ds = ray.data.read_json(groups[kind], lines=True) if kind == "json" else ray.data.read_parquet(groups[kind])
        parts.append(ds.map(_columns_row))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _columns_row(r: dict[str, Any]) -> dict[str, Any]:
    meta = r.get("metadata")
    if not isinstance(meta, dict):
        meta = {k: v for k, v in r.items() if k not in ("text", "metadata") and v is not None}
    source = str(meta.get("source") or r.get("source") or r.get("id") or "")
    return _row(r.get("text"), {k: v for k, v in meta.items() if k != "source"}, source)


class Internalizer:
    """A Ray Data actor: loads the model once, turns batches of texts into adapter bytes."""

    def __init__(self, spec: dict[str, Any], consolidate: str | None) -> None:
        self.model = ModelSpec.model_validate(spec).load()
        self.consolidate = consolidate
        if consolidate == "now" and not hasattr(self.model, "consolidate"):
            raise InvalidInputError("this version of HyperLoRAModel has no consolidate(); ingest without --consolidate")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        out: dict[str, list] = {"id": [], "blob": [], "text": [], "error": [], "node": []}
        for adapter_id, text, meta, source, error in zip(
            batch["id"], batch["text"], batch["metadata"], batch["source"], batch["error"]
        ):
            blob = b""
            if not error:
                try:
                    adapter = self.model.internalize(str(text), source=str(source), progress=False)
                    if self.consolidate == "now":
                        adapter = self.model.consolidate(str(text), adapter, source=str(source), progress=False)
                    adapter.metadata.id = str(adapter_id)
                    adapter.metadata.user_metadata = json.loads(meta)
                    blob = adapter.to_bytes()
                except Exception as exc:  # one bad document must not sink the batch: reported per id
                    error = f"{type(exc).__name__}: {exc}"
            out["id"].append(str(adapter_id))
            out["blob"].append(blob)
            out["text"].append(str(text))
            out["error"].append(str(error))
            out["node"].append(node)
        return out


def ingest(
    paths: Sequence[str | Path],
    store: AdapterStore | str | Path,
    *,
    spec: ModelSpec | None = None,
    namespace: str = "default",
    consolidate: Literal["now"] | None = None,
    batch_size: int = 4,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    resources: dict[str, float] | None = None,
    progress: bool = True,
) -> IngestReport:
    """Internalize every document of ``paths`` not yet in ``store`` (Ray must be connected).

    Ids are ``document_id(namespace, text)``, the ids ``InternalizedCorpus`` and
    ``POST /v1/documents`` give, so documents ingested here are ``model`` values of the server
    and are skipped by later ingests and ``add_texts`` calls alike. ``resources`` (custom Ray
    resources per actor) places the actors, e.g. on the nodes with accelerators.
    """
    from tqdm.auto import tqdm

    check_name(namespace, "namespace")
    if consolidate not in (None, "now"):
        raise InvalidInputError(f"consolidate must be None or 'now', got {consolidate!r}")
    if batch_size < 1 or concurrency < 1:
        raise InvalidInputError("batch_size and concurrency must be positive")
    spec = spec or ModelSpec()
    own = not isinstance(store, AdapterStore)
    store = AdapterStore(store) if own else store
    start = time.perf_counter()
    try:
        done_ids = {m.id for m in store.list(namespace=namespace)}
        done_ids |= {j.id for j in store.pending(namespace=namespace, kind="document")}
        done_hashes = {m.content_hash for m in store.list(namespace=namespace) if m.content_hash}

        def with_id(row: dict[str, Any]) -> dict[str, Any]:
            row["id"] = document_id(namespace, row["text"]) if not row["error"] else f"error:{row['source']}"
            row["done"] = row["id"] in done_ids or (not row["error"] and content_hash(row["text"]) in done_hashes)
            return row

        rows = read_corpus(paths).map(with_id).materialize()
        total = rows.count()
        todo = rows.filter(lambda r: not r["done"])
        pending = todo.count()
        written, failed, nodes = 0, {}, set()
        results = ()
        if pending:  # no actor (no model load) when everything is stored already
            results = todo.map_batches(
                Internalizer,
                fn_constructor_kwargs={"spec": spec.model_dump(mode="json"), "consolidate": consolidate},
                batch_size=batch_size,
                concurrency=concurrency,
                num_cpus=num_cpus,
                **({"resources": resources} if resources else {}),
            ).iter_rows()
        bar = tqdm(total=pending, desc="ingest", unit="doc", disable=not progress)
        for row in results:
            bar.update(1)
            nodes.add(row["node"])
            if row["error"]:
                failed[row["id"]] = row["error"]
                continue
            if store.contains(row["id"], namespace=namespace):  # the same text twice in the corpus
                continue
            store.put(Adapter.from_bytes(row["blob"]), namespace=namespace, text=row["text"])
            written += 1
        bar.close()
    finally:
        if own:
            store.close()
    seconds = time.perf_counter() - start
    return IngestReport(
        total=total,
        skipped=total - pending,
        written=written,
        failed=failed,
        nodes=sorted(nodes),
        seconds=round(seconds, 3),
        documents_per_second=round(written / seconds, 3) if seconds > 0 else 0.0,
    )
