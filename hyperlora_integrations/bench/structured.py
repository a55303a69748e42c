"""Structured output benchmark: schema-valid rate and per-token cost, constrained vs prompted.

``hyperlora bench structured [--prompts 50] [--max-new-tokens 96] [--tiny] [--out DIR]``

Both conditions see the same chat prompt, which describes the schema in the system message as
``ChatHyperLoRA.with_structured_output`` does. *Prompted* decodes freely and parses the reply the
way LangChain's ``JsonOutputParser`` would (a code fence is stripped); *constrained* decodes under
the schema's grammar (``json_schema=``). A reply counts as valid when it parses and validates
against the original schema (``jsonschema``). Greedy decoding, so a rerun gives the same texts.

Per-token cost: each condition's decode time over its completion tokens, and, more precisely,
the time spent inside the grammar processor per constrained token (mask, closing probes) as a
fraction of a free decoding step. Both are measured in the same process, interleaved prompt by
prompt, so load on a shared machine affects the two alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from transformers import LogitsProcessor

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "occupation": {"type": "string"},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                "required": ["city", "country"],
            },
            "email": {"type": "string"},
        },
        "required": ["name", "age", "address"],
    },
    "order": {
        "type": "object",
        "properties": {
            "customer": {"type": "string"},
            "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"product": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
                    "required": ["product", "quantity"],
                },
                "minItems": 1,
                "maxItems": 5,
            },
            "express": {"type": "boolean"},
        },
        "required": ["customer", "status", "items"],
    },
    "review": {
        "type": "object",
        "properties": {
            "product": {"type": "string"},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
            "pros": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "cons": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        },
        "required": ["product", "rating", "sentiment"],
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "day": {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]},
            "location": {
                "type": "object",
                "properties": {"venue": {"type": "string"}, "city": {"type": "string"}},
                "required": ["city"],
            },
            "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 6},
            "online": {"type": "boolean"},
        },
        "required": ["title", "day", "location"],
    },
    "weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "temperature_c": {"type": "number"},
            "conditions": {"enum": ["sunny", "cloudy", "rain", "snow", "storm"]},
            "forecast": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"day": {"type": "string"}, "high_c": {"type": "number"}},
                    "required": ["day", "high_c"],
                },
                "maxItems": 3,
            },
            "alert": {"type": ["string", "null"]},
        },
        "required": ["city", "temperature_c", "conditions"],
    },
}

# Ten subjects per schema, each asked five ways: 50 distinct prompts per schema.
_SUBJECTS = {
    "person": [
        "Maria Lopez, a 34-year-old nurse from Madrid, Spain",
        "Kenji Sato, 52, an architect living in Osaka, Japan",
        "Amara Okafor, a 27-year-old software engineer in Lagos, Nigeria",
        "Lars Nilsson, 61, a retired fisherman from Bergen, Norway",
        "Priya Raman, a 45-year-old teacher in Chennai, India",
        "Tom Becker, 19, a student in Hamburg, Germany",
        "Chloe Martin, a 38-year-old chef from Lyon, France",
        "Diego Alvarez, 73, a painter living in Lima, Peru",
        "Fatima Zahra, a 30-year-old pharmacist in Casablanca, Morocco",
        "Ethan Brooks, 41, a firefighter from Denver, USA",
    ],
    "order": [
        "Alice ordered two lamps and one rug; it has shipped",
        "Bob's order of five notebooks is still pending",
        "Carla cancelled her order for a bicycle",
        "David received three mugs and a teapot yesterday",
        "Eva ordered one laptop with express delivery; it is pending",
        "Farid's order of four chairs and a table was shipped",
        "Grace got her delivery of ten pencils",
        "Hugo ordered a tent and two sleeping bags, shipped express",
        "Ines cancelled an order of six glasses",
        "Jon's order for a guitar and strings has been delivered",
    ],
    "review": [
        "the Zephyr headphones: great sound, but the battery is weak, 4 stars",
        "the Acme blender: loud and broke after a week, 1 star",
        "the Nimbus umbrella: sturdy and light, 5 stars",
        "the Orbit desk lamp: fine, nothing special, 3 stars",
        "the Kestrel running shoes: comfortable, pricey, 4 stars",
        "the Polar kettle: leaks water, 2 stars",
        "the Atlas backpack: roomy, good zippers, 5 stars",
        "the Echo speaker: decent sound, weak bass, 3 stars",
        "the Vega phone case: cracked on the first drop, 1 star",
        "the Luna pillow: soft and cool, 5 stars",
    ],
    "event": [
        "a book club meeting on Tuesday at the Central Library in Boston",
        "a jazz concert on Saturday at the Blue Note in New York",
        "an online yoga class on Monday hosted from Berlin",
        "a team offsite on Thursday in Lisbon with Ana, Ben and Chen",
        "a farmers market on Sunday in the town square of Ghent",
        "a chess tournament on Friday at the Royal Hall in London",
        "a cooking workshop on Wednesday in Naples",
        "a hackathon on Saturday at the Tech Hub in Nairobi",
        "a charity run on Sunday in Vancouver",
        "a board meeting on Monday in Singapore with Li, Omar and Rosa",
    ],
    "weather": [
        "Paris, 18 degrees and cloudy, rain expected tomorrow",
        "Cairo, 35 degrees and sunny, a heat alert is in effect",
        "Oslo, minus 4 degrees with snow",
        "Miami, 29 degrees, storms in the afternoon, storm warning",
        "Tokyo, 22 degrees and sunny, cloudy on Friday",
        "London, 12 degrees and rain all week",
        "Sydney, 25 degrees and sunny",
        "Denver, 3 degrees and snow, highs of 6 tomorrow",
        "Mumbai, 31 degrees, heavy rain, flood alert",
        "Toronto, 15 degrees and cloudy",
    ],
}
_ASKS = (
    "Extract the data about {s}.",
    "Fill in the record for {s}.",
    "Describe {s} as structured data.",
    "Give me the details of {s}.",
    "Turn this into a record: {s}.",
)
_FENCE = re.compile(r"\A\s*```(?:json)?\s*(.*?)\s*```\s*\Z", re.DOTALL)


def prompts(schema: str, n: int) -> list[str]:
    """``n`` distinct prompts for ``schema`` (at most 50)."""
    all_prompts = [ask.format(s=s) for ask in _ASKS for s in _SUBJECTS[schema]]  # subjects first: a varied sample
    return all_prompts[:n]


def instruction(schema: dict[str, Any]) -> str:
    """The system message ``ChatHyperLoRA`` sends for ``with_structured_output(method='json_schema')``."""
    return "Reply with only a JSON object that conforms to this JSON schema, with no other text:\n" + json.dumps(
        schema, ensure_ascii=False
    )


def is_valid(text: str, schema: dict[str, Any]) -> bool:
    """Parses (a code fence stripped, as LangChain's parser does) and validates against ``schema``."""
    import jsonschema

    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
        jsonschema.validate(value, schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


class _Timed(LogitsProcessor):
    """Wraps a logits processor's ``__call__`` to add up the time spent in it."""

    def __init__(self, processor: LogitsProcessor) -> None:
        self.processor = processor
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        try:
            return self.processor(input_ids, scores)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def run(
    model,
    *,
    n_prompts: int,
    max_new_tokens: int,
    schemas: list[str],
    progress: bool = True,
    on_record: Any = None,
    done: list[dict[str, Any]] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Generate every (schema, prompt) pair both ways; return per-pair records and a summary.

    Pairs go round-robin over the schemas (prompt 1 of each, then prompt 2, ...), and
    ``on_record(records)`` is called after each, so a run stopped early is still a balanced sample.
    ``done`` are records of an earlier run of the same settings (their pairs are not redone);
    ``shard=(k, n)`` takes every n-th pair from the k-th, so n processes share the work.
    """
    from ..constrained import constraint_processor

    records: list[dict[str, Any]] = list(done or [])
    finished = {(r["schema"], r["prompt"]) for r in records}
    per_schema = {name: prompts(name, n_prompts) for name in schemas}
    order = [(name, i, per_schema[name][i]) for i in range(n_prompts) for name in schemas]
    order = [pair for j, pair in enumerate(order) if j % shard[1] == shard[0]]
    for name, i, prompt in order:
        if (name, prompt) in finished:
            continue
        schema = SCHEMAS[name]
        messages = [{"role": "system", "content": instruction(schema)}, {"role": "user", "content": prompt}]
        row: dict[str, Any] = {"schema": name, "prompt": prompt}
        for condition in ("prompted", "constrained"):
            extra: dict[str, Any] = {}
            timed = None
            if condition == "constrained":
                proc = constraint_processor(model.tokenizer, model._eos_ids, json_schema=schema)
                proc.set_budget(max_new_tokens)
                timed = _Timed(proc)
                extra["logits_processor"] = [timed]
            start = time.perf_counter()
            chunk = model.complete(messages, max_new_tokens=max_new_tokens, **extra)
            wall = time.perf_counter() - start
            row[condition] = {
                "text": chunk.text,
                "valid": is_valid(chunk.text, schema),
                "tokens": chunk.completion_tokens,
                "finish": chunk.finish_reason,
                "wall_s": round(wall, 4),
                "grammar_s": round(timed.seconds, 5) if timed else 0.0,
                "grammar_calls": timed.calls if timed else 0,
            }
        records.append(row)
        if on_record is not None:
            on_record(records)
        if progress:
            p, c = row["prompted"], row["constrained"]
            print(
                f"[{name} {i + 1}/{n_prompts}] prompted valid={p['valid']} ({p['tokens']} tok) "
                f"constrained valid={c['valid']} ({c['tokens']} tok)",
                file=sys.stderr,
                flush=True,
            )
    return {"records": records, "summary": summarize(records)}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Valid rates per schema and overall; per-token times; grammar overhead per token."""

    def rate(rows, cond):
        return sum(r[cond]["valid"] for r in rows) / len(rows) if rows else 0.0

    def per_token(rows, cond):
        tokens = sum(r[cond]["tokens"] for r in rows)
        return sum(r[cond]["wall_s"] for r in rows) / tokens if tokens else 0.0

    by_schema = {}
    for name in dict.fromkeys(r["schema"] for r in records):
        rows = [r for r in records if r["schema"] == name]
        by_schema[name] = {"n": len(rows), "prompted": rate(rows, "prompted"), "constrained": rate(rows, "constrained")}
    free_s = per_token(records, "prompted")
    constrained_s = per_token(records, "constrained")
    calls = sum(r["constrained"]["grammar_calls"] for r in records)
    grammar_s = sum(r["constrained"]["grammar_s"] for r in records) / calls if calls else 0.0
    return {
        "pairs": len(records),
        "valid_rate": {"prompted": rate(records, "prompted"), "constrained": rate(records, "constrained")},
        "by_schema": by_schema,
        "ms_per_token": {"prompted_free": 1000 * free_s, "constrained": 1000 * constrained_s},
        "grammar_ms_per_token": 1000 * grammar_s,
        "grammar_overhead_vs_free_step": grammar_s / free_s if free_s else None,
        "end_to_end_overhead": constrained_s / free_s - 1 if free_s else None,
    }


def report(summary: dict[str, Any]) -> str:
    """A short Markdown table of ``summary``."""
    lines = [
        f"Pairs (schema x prompt): {summary['pairs']}",
        "",
        "| schema | n | prompted valid | constrained valid |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in summary["by_schema"].items():
        lines.append(f"| {name} | {row['n']} | {row['prompted']:.0%} | {row['constrained']:.0%} |")
    v = summary["valid_rate"]
    lines.append(f"| **all** | {summary['pairs']} | {v['prompted']:.1%} | {v['constrained']:.1%} |")
    t = summary["ms_per_token"]
    lines += [
        "",
        f"Per-token decode time: free {t['prompted_free']:.1f} ms, constrained {t['constrained']:.1f} ms "
        f"(end to end {summary['end_to_end_overhead']:+.1%}); time inside the grammar processor "
        f"{summary['grammar_ms_per_token']:.2f} ms per token = {summary['grammar_overhead_vs_free_step']:.1%} "
        "of a free decoding step.",
    ]
    return "\n".join(lines) + "\n"


def _resumable(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of an earlier run in ``path`` with the same model and token budget (else none):
    a run killed mid-way (a session ending, a machine reclaimed) continues where it stopped."""
    try:
        old = json.loads(path.read_text())
        same = all(old["meta"].get(key) == meta[key] for key in ("model", "max_new_tokens"))
        return list(old["records"]) if same else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _merge(dirs: list[Path], out: Path) -> int:
    """One summary and report over several runs' records (shards), a pair counted once."""
    records: dict[tuple[str, str], dict[str, Any]] = {}
    metas = []
    for d in dirs:
        try:
            data = json.loads((d / "results.json").read_text())
        except (OSError, ValueError) as exc:
            print(f"hyperlora bench structured: cannot read {d / 'results.json'}: {exc}", file=sys.stderr)
            return 2
        metas.append(data.get("meta", {}))
        for r in data.get("records", []):
            records.setdefault((r["schema"], r["prompt"]), r)
    if len({(m.get("model"), m.get("max_new_tokens")) for m in metas}) > 1:
        print("hyperlora bench structured: the runs differ in model or --max-new-tokens", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    rows = list(records.values())
    merged = {
        "records": rows,
        "summary": summarize(rows),
        "meta": {**metas[0], "merged_from": [str(d) for d in dirs], "shards": metas},
    }
    (out / "results.json").write_text(json.dumps(merged, indent=1, ensure_ascii=False))
    text = report(merged["summary"])
    (out / "report.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hyperlora bench structured", description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=50, help="prompts per schema (at most 50)")
    p.add_argument("--schemas", default=",".join(SCHEMAS), help="comma-separated subset of: " + ",".join(SCHEMAS))
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--tiny", action="store_true", help="tiny random model (tests; numbers meaningless)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all CPUs)")
    p.add_argument("--out", default="bench-out/structured", help="writes results.json and report.md here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--shard", default="0/1", help="K/N: this process does every N-th pair from the K-th")
    p.add_argument(
        "--merge", nargs="+", metavar="DIR", help="only summarise the results.json of these runs (shards) into --out"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        return _merge([Path(d) for d in args.merge], out)
    schemas = [s.strip() for s in args.schemas.split(",") if s.strip()]
    unknown = [s for s in schemas if s not in SCHEMAS]
    if unknown or not 1 <= args.prompts <= 50:
        print(f"hyperlora bench structured: unknown schemas {unknown} or --prompts not in 1..50", file=sys.stderr)
        return 2
    try:
        k, n = (int(x) for x in args.shard.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        print(f"hyperlora bench structured: --shard takes K/N with 0 <= K < N, got {args.shard!r}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.tiny:
        from ..testing import tiny_hyperlora_model

        model = tiny_hyperlora_model()
    else:
        from ..model import HyperLoRAModel

        model = HyperLoRAModel.from_pretrained(d2l=None, t2l=None)
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model.name,
        "argv": argv if argv is not None else sys.argv[1:],
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
    }
    done = _resumable(out / "results.json", meta)
    if done and not args.quiet:
        print(f"resuming: {len(done)} pairs already in {out / 'results.json'}", file=sys.stderr)

    def save(records: list[dict[str, Any]], complete: bool = False) -> dict[str, Any]:
        results = {
            "records": records,
            "summary": summarize(records),
            "meta": {**meta, "complete": complete, "wall_s": round(time.perf_counter() - start, 1)},
        }
        (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
        return results

    finished = run(
        model,
        n_prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        schemas=schemas,
        progress=not args.quiet,
        on_record=save,
        done=done,
        shard=(k, n),
    )
    results = save(finished["records"], complete=True)
    text = report(results["summary"])
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
