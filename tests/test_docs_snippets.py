"""Every fenced Python snippet in README.md and docs/*.md runs as written.

The snippets of one document run in order in one namespace, as a reader runs them top to bottom
(a later snippet may use the ``model`` an earlier one loaded). The fast test runs them on the
tiny random model: ``HyperLoRAModel.from_pretrained`` (and any model loaded by name) returns it,
and the files the snippets open (``handbook.txt``, ``report.txt``) exist in a temporary working
directory. Top-level ``await`` works as in a notebook.

A snippet can be marked by an HTML comment on the line before its fence:

- ``<!-- docs-test: slow (reason) -->``: needs the real model; runs only in the slow test, which
  runs the whole document on SmolLM2-135M with the shipped hypernetworks;
- ``<!-- docs-test: skip (reason) -->``: cannot run here at all (a GPU, a server, downloads);
  the reason is required.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK_RE = re.compile(r"<!--\s*docs-test:\s*(\w+)\s*(?:\((.*)\))?\s*-->")
FILES = {
    "handbook.txt": "Employee handbook. New hires get 25 vacation days per year. The office opens at 8:30.\n",
    "report.txt": "The Feldrach observatory was founded by Ilse Marrow in 1911, on Mount Feldrach.\n",
}


@dataclass
class Snippet:
    path: Path
    line: int
    code: str
    mark: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    """The ```python blocks of a Markdown file, with the mark on the line before each (if any)."""
    lines = path.read_text().splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith("```python"):
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            match = MARK_RE.search(previous)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
            out.append(
                Snippet(
                    path,
                    i + 1,
                    "\n".join(lines[i + 1 : end]) + "\n",
                    match.group(1) if match else None,
                    (match.group(2) or "") if match else "",
                )
            )
            i = end
        i += 1
    return out


ALL = [s for doc in DOCUMENTS for s in snippets(doc)]
WITH_SNIPPETS = [doc for doc in DOCUMENTS if snippets(doc)]


def run_snippet(snippet: Snippet, namespace: dict) -> None:
    code = compile(snippet.code, snippet.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & inspect.CO_COROUTINE:
        asyncio.run(eval(code, namespace))
    else:
        exec(code, namespace)


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    """A working directory with the files the snippets open, and LlamaIndex settings restored."""
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    try:
        from llama_index.core import Settings

        monkeypatch.setattr(Settings, "_llm", None)
        monkeypatch.setattr(Settings, "_embed_model", None)
    except ImportError:
        pass
    return tmp_path


def use_model(monkeypatch, model) -> None:
    """Every way the snippets load a model returns ``model``."""
    import hyperlora_integrations._arguments as arguments
    from hyperlora_integrations.model import HyperLoRAModel

    monkeypatch.setattr(HyperLoRAModel, "from_pretrained", classmethod(lambda cls, *a, **k: model))
    monkeypatch.setattr(arguments, "shared_model", lambda *a, **k: model)
    try:
        import hyperlora_integrations.langchain.chat_models as chat_models

        if hasattr(chat_models, "_load_model"):
            monkeypatch.setattr(chat_models, "_load_model", lambda *a, **k: model)
    except ImportError:
        pass


def run_document(doc: Path, *, slow: bool) -> list[str]:
    namespace: dict = {"__name__": "__docs__"}
    ran = []
    for snippet in snippets(doc):
        if snippet.mark == "skip" or (snippet.mark == "slow" and not slow):
            continue
        try:
            run_snippet(snippet, namespace)
        except Exception as exc:
            raise AssertionError(f"the snippet at {snippet.where} failed: {type(exc).__name__}: {exc}") from exc
        ran.append(snippet.where)
    return ran


def test_marks_are_known_and_skips_give_a_reason():
    assert len(ALL) >= 10, "the README and docs lost their snippets?"
    for snippet in ALL:
        assert snippet.mark in (None, "slow", "skip"), f"unknown mark {snippet.mark!r} at {snippet.where}"
        if snippet.mark == "skip":
            assert snippet.reason.strip(), f"a skipped snippet needs a reason: {snippet.where}"
    unmarked = [s for s in ALL if s.mark is None]
    assert len(unmarked) >= len(ALL) * 2 // 3, "most snippets must run on the tiny model"


@pytest.mark.parametrize("doc", WITH_SNIPPETS, ids=lambda p: p.name)
def test_snippets_run_on_the_tiny_model(doc, sandbox, monkeypatch):
    from hyperlora_integrations.testing import tiny_hyperlora_model

    use_model(monkeypatch, tiny_hyperlora_model())
    run_document(doc, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in WITH_SNIPPETS if any(s.mark == "slow" for s in snippets(d))], ids=str)
def test_snippets_run_on_the_real_model(doc, sandbox):
    assert run_document(doc, slow=True)
