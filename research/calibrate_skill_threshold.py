"""Calibrate ``SkillLibrary``'s routing threshold on requests labelled in scope / out of scope.

``auto_skill`` applies the best-matching skill when its similarity clears the threshold. Too
low, and off-topic requests get a skill they do not want (an adapter that changes the answer for
nothing); too high, and the skill never fires. This script builds a library of six skills on the
default model, scores 48 in-scope requests (8 per skill) and 48 out-of-scope ones (chit-chat,
general knowledge, and tasks next to but outside the skills), picks the threshold that maximises
(correctly routed in-scope rate - routed out-of-scope rate) on the even-numbered requests, and
reports the rates at that threshold on the odd-numbered ones (held out) and on all of them.

    HF_HUB_OFFLINE=1 .venv/bin/python -m research.calibrate_skill_threshold --out docs/results/skill_threshold.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SKILLS = {
    "sql": "Write SQL queries for the sales database.",
    "translate_fr": "Translate English text into French.",
    "summarize": "Summarize the user's text in one short sentence.",
    "sentiment": "Classify the sentiment of a movie review as positive or negative.",
    "formal_email": "Rewrite the user's text as a polite, formal business email.",
    "python_bug": "Find and fix the bug in a Python function.",
}

IN_SCOPE = {
    "sql": [
        "Write a query that returns total sales per region for 2023.",
        "Select the ten customers with the highest order value.",
        "How do I count orders per month in the sales table with SQL?",
        "Give me the SQL to find products that never sold.",
        "Join the orders and customers tables and list each customer's last order date.",
        "SQL: average discount by sales representative.",
        "Query the database for revenue by product category last quarter.",
        "Write a SELECT statement listing invoices over 1000 dollars.",
    ],
    "translate_fr": [
        "Translate into French: the meeting is moved to Tuesday.",
        "How do you say 'good morning, how are you?' in French?",
        "Please translate this sentence to French: I love the sea.",
        "French translation of: where is the train station?",
        "Translate 'thank you for your help' into French.",
        "Can you put this in French: the shop opens at nine.",
        "Render this English text in French: we will arrive late tonight.",
        "English to French: my brother lives in Canada.",
    ],
    "summarize": [
        "Summarize this: The council met on Monday and voted to extend library hours through the summer.",
        "Give me a one-sentence summary of the following paragraph about quarterly earnings.",
        "TL;DR of this article: researchers found that sleep improves memory consolidation.",
        "Summarize the text below in a sentence.",
        "Can you condense this report into one line?",
        "Briefly summarize: the storm closed schools and roads across the county on Friday.",
        "Sum up this email thread in a single sentence.",
        "What is the gist of this passage, in one sentence?",
    ],
    "sentiment": [
        "Is this review positive or negative? 'A dull, joyless film.'",
        "Classify the sentiment: 'I loved every minute of this movie.'",
        "Movie review: 'The acting was wooden and the plot made no sense.' Positive or negative?",
        "What is the sentiment of this review: 'A triumph, moving and funny.'",
        "Tell me if this film review is positive: 'Two hours I will never get back.'",
        "Sentiment of: 'Beautifully shot, but the story drags.'",
        "Rate this review as positive or negative: 'An instant classic.'",
        "Does this reviewer like the movie? 'I walked out halfway through.'",
    ],
    "formal_email": [
        "Make this formal: hey, send the report by friday",
        "Rewrite as a professional email: can't make the meeting, sorry",
        "Turn this into a polite business email: where's my invoice??",
        "Write this more formally for my boss: I need next week off",
        "Rephrase as a formal email to a client: the delivery will be late",
        "Polish this message into a formal email: thx for the quick reply",
        "Convert to a courteous business email: your payment is overdue",
        "Make this sound professional: we gotta reschedule the call",
    ],
    "python_bug": [
        "Fix the bug in this Python function: def add(a, b): return a - b",
        "Why does my Python loop never end? while i < 10: print(i)",
        "This function should return the max of a list but returns None, please fix it.",
        "Debug this Python code: for i in range(len(xs)): xs.remove(xs[i])",
        "My Python function raises IndexError on empty lists, fix it.",
        "Find the error: def is_even(n): return n % 2 == 1",
        "Correct this Python snippet that reverses a string wrongly.",
        "What's wrong with this recursive factorial in Python that never stops?",
    ],
}

OUT_OF_SCOPE = [
    # chit-chat
    "Hi there!",
    "How are you today?",
    "Tell me a joke.",
    "What's your name?",
    "Thanks, that's all for now.",
    "Good night!",
    "Can you help me?",
    "I'm bored.",
    # general knowledge
    "What is the capital of Australia?",
    "Who wrote Pride and Prejudice?",
    "How far is the Moon from the Earth?",
    "Why is the sky blue?",
    "When did the Second World War end?",
    "What is photosynthesis?",
    "How many legs does a spider have?",
    "Who painted the Mona Lisa?",
    # advice and opinions
    "What should I cook for dinner tonight?",
    "Recommend a good book for a long flight.",
    "How can I sleep better?",
    "Is it better to rent or buy a house?",
    "What are some tips for a job interview?",
    "How do I start running as a beginner?",
    "Plan a three-day trip to Rome.",
    "What gift should I buy for my mother?",
    # tasks next to the skills but not theirs
    "Translate this into German: the weather is nice.",
    "Write a poem about autumn.",
    "Write a JavaScript function that sorts an array.",
    "Explain what a database index is.",
    "Write a short story about a dragon.",
    "Classify this email as spam or not spam.",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "Solve 3x + 5 = 20.",
    # assorted requests
    "Set a reminder for my dentist appointment.",
    "What's the weather like in Paris?",
    "Give me a list of ten animal names.",
    "Explain quantum computing to a child.",
    "What time zone is Tokyo in?",
    "Suggest a name for my new puppy.",
    "How do I change a flat tire?",
    "What are the rules of chess?",
    "Describe the water cycle.",
    "List three benefits of exercise.",
    "How does a bicycle work?",
    "What's a good stretching routine?",
    "Explain the difference between weather and climate.",
    "Who is the president of France?",
    "What is the boiling point of water at altitude?",
    "Write a haiku about the ocean.",
]


def rates(records: list[dict], threshold: float) -> dict[str, float]:
    """In scope: routed to the right skill / to a wrong one / not routed. Out of scope: routed."""
    inside = [r for r in records if r["label"] is not None]
    outside = [r for r in records if r["label"] is None]
    right = sum(r["score"] >= threshold and r["top"] == r["label"] for r in inside)
    wrong = sum(r["score"] >= threshold and r["top"] != r["label"] for r in inside)
    false = sum(r["score"] >= threshold for r in outside)
    return {
        "in_scope_correct": right / len(inside),
        "in_scope_wrong_skill": wrong / len(inside),
        "in_scope_unrouted": 1 - (right + wrong) / len(inside),
        "out_of_scope_routed": false / len(outside),
        "n_in_scope": len(inside),
        "n_out_of_scope": len(outside),
    }


def calibrate(records: list[dict]) -> float:
    """The threshold maximising correct in-scope rate minus routed out-of-scope rate (ties: the
    midpoint of the best interval, so it is not glued to one request's score)."""
    cuts = sorted({r["score"] for r in records})
    candidates = [cuts[0] - 1e-3] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:], strict=False)] + [cuts[-1] + 1e-3]

    def objective(t: float) -> float:
        r = rates(records, t)
        return r["in_scope_correct"] - r["out_of_scope_routed"]

    best = max(objective(t) for t in candidates)
    winners = [t for t in candidates if objective(t) == best]
    return (winners[0] + winners[-1]) / 2


def auc(records: list[dict]) -> float:
    """Probability that an in-scope request outscores an out-of-scope one (0.5: no signal)."""
    inside = [r["score"] for r in records if r["label"] is not None]
    outside = [r["score"] for r in records if r["label"] is None]
    return sum((a > b) + 0.5 * (a == b) for a in inside for b in outside) / (len(inside) * len(outside))


def measure(model, router: str) -> dict:
    """Scores of every labelled request under one router, the calibrated threshold and its rates."""
    from hyperlora_integrations.adapters import AdapterStore
    from hyperlora_integrations.skills import SkillLibrary

    library = SkillLibrary(model, AdapterStore(), router=router)
    for name, description in SKILLS.items():
        library.add(name, description)
    labelled = [(text, name) for name, texts in IN_SCOPE.items() for text in texts]
    labelled += [(text, None) for text in OUT_OF_SCOPE]
    records = []
    for i, (text, label) in enumerate(labelled):
        top, score = library.scores(text)[0]
        records.append({"text": text, "label": label, "top": top, "score": round(score, 4), "fold": i % 2})
    fit = [r for r in records if r["fold"] == 0]
    held = [r for r in records if r["fold"] == 1]
    threshold = calibrate(fit)
    inside = [r for r in records if r["label"] is not None]
    return {
        "encoder": type(library._encoder).__name__,
        "auc_in_vs_out": round(auc(records), 4),
        "top1_correct_in_scope": sum(r["top"] == r["label"] for r in inside) / len(inside),
        "threshold": round(threshold, 4),
        "fit_rates": rates(fit, threshold),
        "held_out_rates": rates(held, threshold),
        "all_rates": rates(records, threshold),
        "old_default_0.15_all_rates": rates(records, 0.15),
        "threshold_fit_on_all": round(calibrate(records), 4),
        "records": records,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (a wiring check only)")
    parser.add_argument("--routers", nargs="+", default=["minilm", "model"], choices=["minilm", "model"])
    args = parser.parse_args(argv)

    import torch

    from hyperlora_integrations import HyperLoRAModel

    torch.set_num_threads(1)
    if args.tiny:
        from hyperlora_integrations.testing import tiny_hyperlora_model

        model = tiny_hyperlora_model()
    else:
        model = HyperLoRAModel.from_pretrained()
    result = {"model": model.name, "routers": {}}
    for router in args.routers:
        result["routers"][router] = measure(model, router)
    summary = {router: {k: v for k, v in r.items() if k != "records"} for router, r in result["routers"].items()}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
