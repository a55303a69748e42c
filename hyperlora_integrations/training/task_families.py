"""Procedural short-answer task families for Text-to-LoRA (issue 22, part 2).

The hypernetwork was trained on ~170 tasks, most of them long-input classification or QA; it
learnt a generic "answer tersely" adapter and nothing of the description (docs/text-to-lora.md).
These families add many short-answer tasks whose answer is a function of the input that only the
description names: the same inputs (numbers, words, countries) map to different outputs under
different families, so an adapter that ignores its description cannot fit them all.

Data comes from registry packages read at run time and never committed (``[train]`` extra):
``num2words`` (LGPL-2.1) for number words, ``inflect`` (MIT) for English articles, ``pycountry`` (LGPL-2.1) for ISO codes; the rest is computed. Each family has five or
more hand-written descriptions (paraphrases, so no wording is learnt as a key).

None covers a task of the held-out skills fixture (``bench/fixtures/heldout_skills.json``: antonym,
plural, capital, number words to digits, upper-casing, English to French words, animal class,
colour, next day, month name, baby animal, currency, continent, first letter) or its dev tasks
(past tense, comparative, city to country, female form). Nearby mappings were left out for that
reason: English number words (the inverse of "number words to digits"), singular nouns (of
"plural"), lower-casing (of "upper-casing"), other letters of a word. ``tests/test_task_families.py``
checks that no family's examples answer a fixture question. Whole families are held out by *group* (a
held-out family has no sibling in training: ``HELD_OUT_GROUPS``).
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .tasks import Example, Task


@dataclass(frozen=True)
class Family:
    name: str
    group: str
    descriptions: tuple[str, ...]
    make: Callable[[random.Random, Sequence[str]], tuple[str, str] | None]  # (input, output), None to skip


def _num2words(lang: str, to: str = "cardinal", top: int = 100):
    def make(rng: random.Random, words: Sequence[str]) -> tuple[str, str]:
        from num2words import num2words

        n = rng.randint(1, top)
        return str(n), num2words(n, lang=lang, to=to)

    return make


def _roman(n: int) -> str:
    out = ""
    for value, sym in ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
                       (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):  # fmt: skip
        while n >= value:
            out, n = out + sym, n - value
    return out


def _article():
    def make(rng: random.Random, words: Sequence[str]) -> tuple[str, str] | None:
        import inflect

        word = rng.choice(words)
        engine = inflect.engine()
        return word, engine.a(word).split()[0]

    return make


def _country(field: str):
    def make(rng: random.Random, words: Sequence[str]) -> tuple[str, str] | None:
        import pycountry

        country = rng.choice(list(pycountry.countries))
        name = getattr(country, "common_name", None) or country.name
        return (name, getattr(country, field)) if name.isascii() and "," not in name else None

    return make


def _language_code(rng: random.Random, words: Sequence[str]) -> tuple[str, str] | None:
    import pycountry

    lang = rng.choice([x for x in pycountry.languages if hasattr(x, "alpha_2")])
    return (lang.name, lang.alpha_2) if lang.name.isascii() else None


def _number(op: Callable[[int], str], top: int = 99):
    def make(rng: random.Random, words: Sequence[str]) -> tuple[str, str]:
        n = rng.randint(1, top)
        return str(n), op(n)

    return make


def _word(op: Callable[[str], str]):
    def make(rng: random.Random, words: Sequence[str]) -> tuple[str, str]:
        word = rng.choice(words)
        return word, op(word)

    return make


def _days_in_month(rng: random.Random, words: Sequence[str]) -> tuple[str, str]:
    month = rng.randint(1, 12)
    return calendar.month_name[month], str(calendar.monthrange(2025, month)[1])


FAMILIES: tuple[Family, ...] = (
    Family(
        "ordinal_words",
        "number_words",
        (
            "Write the number as an English ordinal word (3 is third).",
            "Spell out the ordinal form of the number in English words.",
            "Give the English ordinal word for this number.",
            "Turn the number into its ordinal, written in words.",
            "Which ordinal word matches the number? Answer with the word.",
        ),
        _num2words("en", "ordinal", 60),
    ),
    Family(
        "spanish_numbers",
        "number_words",
        (
            "Write the number in Spanish words.",
            "Spell out the number in Spanish.",
            "How is this number written in Spanish? Answer with the words only.",
            "Translate the number into Spanish words.",
            "Give the Spanish word for the number.",
        ),
        _num2words("es"),
    ),
    Family(
        "german_numbers",
        "number_words",
        (
            "Write the number in German words.",
            "Spell out the number in German.",
            "How do you write this number in German? Answer with the word only.",
            "Translate the number into a German number word.",
            "Give the German word for the number.",
        ),
        _num2words("de"),
    ),
    Family(
        "roman_numerals",
        "numeral_systems",
        (
            "Write the number in Roman numerals.",
            "Convert the number to a Roman numeral.",
            "Give the Roman numeral for the number.",
            "How would the Romans write this number? Answer with the numeral.",
            "Express the number with Roman numerals (I, V, X, L, C).",
        ),
        _number(_roman),
    ),
    Family(
        "binary",
        "numeral_systems",
        (
            "Write the number in binary.",
            "Convert the decimal number to base 2.",
            "Give the binary representation of the number.",
            "Express the number using only 0s and 1s (base two).",
            "What is this number in binary? Answer with the digits only.",
        ),
        _number(lambda n: format(n, "b")),
    ),
    Family(
        "double",
        "arithmetic",
        (
            "Double the number.",
            "Multiply the number by two.",
            "Give twice the number.",
            "What is two times this number? Answer with the number.",
            "Return the number added to itself.",
        ),
        _number(lambda n: str(2 * n)),
    ),
    Family(
        "plus_ten",
        "arithmetic",
        (
            "Add ten to the number.",
            "Give the number plus 10.",
            "What is the number increased by ten? Answer with the number.",
            "Increase the number by 10.",
            "Return the sum of the number and ten.",
        ),
        _number(lambda n: str(n + 10)),
    ),
    Family(
        "digit_sum",
        "arithmetic",
        (
            "Add up the digits of the number.",
            "Give the sum of the number's digits.",
            "What do the digits of this number add up to? Answer with the number.",
            "Compute the digit sum of the number.",
            "Sum the individual digits of the number.",
        ),
        _number(lambda n: str(sum(map(int, str(n)))), 999),
    ),
    Family(
        "parity",
        "arithmetic",
        (
            "Say whether the number is even or odd.",
            "Is the number even or odd? Answer with one word.",
            "Classify the number as even or odd.",
            "Tell if the number is odd or even.",
            "Answer 'even' if the number is divisible by two, otherwise 'odd'.",
        ),
        _number(lambda n: "even" if n % 2 == 0 else "odd", 999),
    ),
    Family(
        "word_length",
        "letters",
        (
            "Count the letters in the word.",
            "How many letters does the word have? Answer with a number.",
            "Give the length of the word in letters.",
            "Say how many characters the word is made of.",
            "Return the number of letters in the given word.",
        ),
        _word(lambda w: str(len(w))),
    ),
    Family(
        "reverse_word",
        "letters",
        (
            "Write the word backwards.",
            "Reverse the letters of the word.",
            "Spell the word from the last letter to the first.",
            "Give the word with its letters in reverse order.",
            "Turn the word around, letter by letter.",
        ),
        _word(lambda w: w[::-1]),
    ),
    Family(
        "indefinite_article",
        "english_grammar",
        (
            "Say whether the word takes 'a' or 'an'.",
            "Give the indefinite article for the word: a or an.",
            "Which article goes before this word, a or an? Answer with the article.",
            "Choose 'a' or 'an' for the word.",
            "Write the correct indefinite article for the noun.",
        ),
        _article(),
    ),
    Family(
        "country_code2",
        "iso_codes",
        (
            "Give the two-letter ISO code of the country.",
            "Write the country's ISO 3166 alpha-2 code.",
            "What is the two-letter country code? Answer with the code only.",
            "Abbreviate the country to its two-letter code.",
            "Return the ISO alpha-2 code for the country.",
        ),
        _country("alpha_2"),
    ),
    Family(
        "country_code3",
        "iso_codes",
        (
            "Give the three-letter ISO code of the country.",
            "Write the country's ISO 3166 alpha-3 code.",
            "What is the three-letter country code? Answer with the code only.",
            "Abbreviate the country to its three-letter code.",
            "Return the ISO alpha-3 code for the country.",
        ),
        _country("alpha_3"),
    ),
    Family(
        "language_code",
        "iso_codes",
        (
            "Give the two-letter ISO 639 code of the language.",
            "Write the language's two-letter code.",
            "What is the ISO code of this language? Answer with the code only.",
            "Abbreviate the language to its two-letter code.",
            "Return the ISO 639-1 code for the language.",
        ),
        _language_code,
    ),
    Family(
        "days_in_month",
        "calendar",
        (
            "How many days does the month have (in a non-leap year)? Answer with a number.",
            "Give the number of days in the month.",
            "Say how long the month is, in days.",
            "Write how many days are in the given month of 2025.",
            "Return the length of the month in days.",
        ),
        _days_in_month,
    ),
)

# Held out by group: no training family shares a held-out family's kind of mapping.
HELD_OUT_GROUPS = ("numeral_systems", "letters", "calendar")


def family_task(family: Family, n: int, seed: int, words: Sequence[str]) -> Task:
    """``n`` distinct examples of a family (fewer where it has fewer distinct inputs); ``words``
    are the English words that word families draw from (the base model's ``vocab_words``)."""
    rng = random.Random(f"family:{family.name}:{seed}")
    seen: dict[str, str] = {}
    for _ in range(20 * n):
        made = family.make(rng, words)
        if made and made[0] not in seen and made[1]:
            seen[made[0]] = made[1]
        if len(seen) >= n:
            break
    examples = [Example(x, y) for x, y in seen.items()]
    return Task(f"family/{family.name}", "gen", list(family.descriptions), examples)


def family_tasks(words: Sequence[str], n: int = 200, seed: int = 0) -> tuple[dict[str, Task], dict[str, Task]]:
    """Training and held-out family tasks, keyed by name."""
    train, held = {}, {}
    for family in FAMILIES:
        task = family_task(family, n, seed, words)
        (held if family.group in HELD_OUT_GROUPS else train)[task.name] = task
    return train, held
