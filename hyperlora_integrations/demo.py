"""``hyperlora demo``: the same questions with no document, the document in the prompt, the instant
(one-pass hypernetwork) adapter and the consolidated adapter, each with its latency and prompt
tokens; the adapters answer with the question alone in the prompt."""

from __future__ import annotations

import time

DOCUMENT = (
    "The Varnholt Observatory was founded in 2031 on the island of Skelmoor by the astronomer "
    "Ilse Tramweg. Its main telescope, called Bright Heron, has a mirror 4.2 metres wide. "
    "The observatory is run by a cooperative of 37 fishing families, who chose teal as its official colour. "
    "Every August it hosts the Lantern Count, a night when visitors count meteors from the harbour wall."
)
QUESTIONS = [
    "Who founded the Varnholt Observatory?",
    "What is the main telescope of the Varnholt Observatory called?",
    "Which families run the Varnholt Observatory?",
]


def run(base_model: str | None = None, max_new_tokens: int = 32) -> None:
    from .model import HyperLoRAModel

    t0 = time.perf_counter()
    model = HyperLoRAModel.from_pretrained(base_model)
    print(
        f"loaded {model.name} in {time.perf_counter() - t0:.1f}s "
        f"(Doc-to-LoRA: {'yes' if model.d2l else 'no'}, Text-to-LoRA: {'yes' if model.t2l else 'no'})\n"
    )
    print(f"Document ({model.count_tokens(DOCUMENT)} tokens):\n  {DOCUMENT}\n")
    adapter = None
    if model.d2l is not None:
        t0 = time.perf_counter()
        adapter = model.internalize(DOCUMENT, source="demo")
        print(f"internalized in {time.perf_counter() - t0:.2f}s -> {adapter}\n")
    t0 = time.perf_counter()
    consolidated = model.consolidate(DOCUMENT, source="demo", progress=True)
    info = consolidated.metadata.model_extra["consolidation"]
    print(
        f"consolidated in {time.perf_counter() - t0:.1f}s ({info['steps']} steps, loss {info['loss_first']:.2f} -> "
        f"{info['loss_last']:.2f}) -> {consolidated}\n"
    )
    conditions = [("no document", {}), ("document in prompt", {"context": DOCUMENT})]
    if adapter is not None:
        conditions.append(("instant adapter", {"adapters": [adapter]}))
    conditions.append(("consolidated adapter", {"adapters": [consolidated]}))
    for question in QUESTIONS:
        print(f"Q: {question}")
        for label, kwargs in conditions:
            t0 = time.perf_counter()
            out = model.complete(question, max_new_tokens=max_new_tokens, **kwargs)
            dt = time.perf_counter() - t0
            answer = " ".join(out.text.split())
            print(f"  [{label:<20}] {dt:5.2f}s  prompt={out.prompt_tokens:>4} tok  {answer}")
        print()
