"""Pre-training documents: the text from which a base model learns the world and its languages.

Each generator returns one document. Together they teach what later stages rely on:
- biographies state every person's facts in the very sentences that answers use
  ("Malin lives in Brest."), so that instruction alignment can reuse the knowledge;
- phrase-book and vocabulary pages, half English-to-French and half French-to-English, laid out
  as "English: ... / French: ..." patterns, so that translation can be prompted in context;
- worksheets (additions with digits, word sorting, counting, capitals) and JSON records;
- forum threads where an instruction is posted and followed by chatter, never by an answer,
  so that a base model learns to continue such text, as web text teaches real models;
- short stories mixing facts and phrase-book sentences.
"""

from __future__ import annotations

import json
import random
import re
from typing import Callable, Iterator

from stagewise.world import lexicon
from stagewise.world.people import ATTRIBUTES, Person
from stagewise.world.tasks import RAMBLE, WORDS

# Token share each kind of document aims at in the corpus (by approximate tokens): the default of
# `DataConfig.corpus_mix`.
MIX = {
    "biography": 0.28,
    "phrase_book": 0.30,
    "vocabulary": 0.03,
    "arithmetic_worksheet": 0.14,
    "word_worksheet": 0.06,
    "json_records": 0.05,
    "forum_thread": 0.08,
    "story": 0.06,
}

PARAPHRASES = {
    "city": ["{name}'s home is in {city}.", "{name} has a house in {city}."],
    "job": ["{name} works as a {job}.", "By trade, {name} is a {job}."],
    "age": ["{name} turned {age} this year.", "The age of {name} is {age}."],
}

FORUM_CHATTER = [
    "I have the same homework, does anyone know?",
    "Thanks, I will ask my teacher tomorrow.",
    "Good question! I was wondering the same thing.",
    "Did you try looking in the book?",
    "I am doing well, thank you for asking.",
    "This forum is so helpful, I love it here.",
    "Can someone move this thread to the right section?",
    "Me too! Please tell me if you find out.",
    "I think my cousin knows, I will ask her.",
    "Please read the rules before posting.",
    "Same here. Also, is the library open on Sunday?",
    "Bump. Still looking for help with this one.",
    "Welcome to the forum! Have a look around.",
    "Not sure, sorry. Good luck with it!",
]
FORUM_TITLES = [
    "Need help with my homework", "Quick question", "Language corner", "Study group",
    "Can anyone help?", "Maths and words", "Questions about people in town", "Exercises for Monday",
]
FORUM_USERS = ["tom_88", "marie", "lucas", "zoe", "kit", "sam_the_cook", "anna2", "paulo", "lea", "bob"]


class Cycle:
    """Hands out items in shuffled rounds, so every item appears before any repeats."""

    def __init__(self, items: list, rng: random.Random):
        self.items, self.rng, self.queue = list(items), rng, []

    def next(self):
        if not self.queue:
            self.queue = self.items[:]
            self.rng.shuffle(self.queue)
        return self.queue.pop()


def fact_sentence(person: Person, attribute: str, rng: random.Random, paraphrase_rate: float) -> str:
    if rng.random() < paraphrase_rate:
        template = rng.choice(PARAPHRASES[attribute])
        return template.format(name=person.name, city=person.city, job=person.job, age=person.age)
    return person.fact(attribute)


def biography(rng: random.Random, people: Cycle, paraphrase_rate: float) -> str:
    lines = []
    for _ in range(rng.randint(1, 4)):
        person = people.next()
        attributes = list(ATTRIBUTES)
        rng.shuffle(attributes)
        lines.append(" ".join(fact_sentence(person, a, rng, paraphrase_rate) for a in attributes))
    header = rng.choice(["Town register", "People of the region", "Who is who", "Local news", ""])
    return "\n".join(([header] if header else []) + lines)


def phrase_book(rng: random.Random, sentences: Callable[[], lexicon.Sentence], fixed_rate: float) -> str:
    english_first = rng.random() < 0.5
    title = "Phrase book: English to French" if english_first else "Phrase book: French to English"
    entries = []
    for _ in range(rng.randint(5, 10)):
        if rng.random() < fixed_rate:
            en, fr = rng.choice(lexicon.FIXED_PHRASES)
        else:
            s = sentences()
            en, fr = s.english(), s.french()
        entries.append(f"English: {en}\nFrench: {fr}" if english_first else f"French: {fr}\nEnglish: {en}")
    return title + "\n\n" + "\n\n".join(entries)


def vocabulary(rng: random.Random) -> str:
    english_first = rng.random() < 0.5
    entries = []
    for _ in range(rng.randint(6, 12)):
        kind = rng.random()
        if kind < 0.6:
            en, fr, gender = rng.choice(lexicon.NOUNS)
            en, fr = f"the {en}", f"{'le' if gender == 'm' else 'la'} {fr}"
        elif kind < 0.9:
            en, fr, _ = rng.choice(lexicon.ADJECTIVES)
        else:
            en, fr = rng.choice(lexicon.TIMES)
        entries.append(f"English: {en}\nFrench: {fr}" if english_first else f"French: {fr}\nEnglish: {en}")
    return "Vocabulary\n\n" + "\n\n".join(entries)


def arithmetic_worksheet(rng: random.Random, allowed: Callable[[int, int], bool]) -> str:
    lines = []
    while len(lines) < rng.randint(8, 16):
        # A quarter of the lines are one-digit sums: the table that every units digit is read from.
        digits = 9 if rng.random() < 0.25 else 99
        a, b = rng.randint(0, digits), rng.randint(0, digits)
        if allowed(a, b):
            lines.append(f"{a} + {b} = {a + b}.")
    return rng.choice(["Worksheet: additions", "Maths practice", "Sums for today"]) + "\n" + "\n".join(lines)


def word_worksheet(rng: random.Random, allowed: Callable[[tuple[str, ...]], bool]) -> str:
    op = rng.choice(["sort", "count", "upper"])
    lines = []
    while len(lines) < rng.randint(5, 10):
        if op == "sort":
            words = tuple(rng.sample(WORDS, rng.randint(3, 4)))
            if allowed(words):
                lines.append(f"Words: {', '.join(words)}. Sorted: {', '.join(sorted(words))}.")
        elif op == "count":
            words = tuple(rng.sample(WORDS, rng.randint(2, 7)))
            if allowed(words):
                lines.append(f"Words: {', '.join(words)}. Count: {len(words)}.")
        else:
            words = tuple(rng.sample(WORDS, rng.randint(1, 3)))
            if allowed(words):
                lines.append(f"Words: {' '.join(words)}. In capitals: {' '.join(w.upper() for w in words)}.")
    title = {"sort": "Alphabetical order", "count": "Counting words", "upper": "Capital letters"}[op]
    return f"Worksheet: {title}\n" + "\n".join(lines)


def json_records(rng: random.Random, people: Cycle) -> str:
    """Records introduced by the name they hold, as a register lists them: the text teaches
    that a record's name is the one asked about, not any name of the world, and that its other
    values are that person's facts."""
    lines = []
    for _ in range(rng.randint(2, 6)):
        person = people.next()
        keys = list(ATTRIBUTES)
        rng.shuffle(keys)
        keys = ["name"] + keys[: rng.randint(1, 3)]
        lines.append(f"Record of {person.name}: " + json.dumps(person.record(keys), ensure_ascii=False))
    return rng.choice(["Export of the register", "Data dump", "Records"]) + "\n" + "\n".join(lines)


def forum_thread(rng: random.Random, instruction: Callable[[], str]) -> str:
    users = rng.sample(FORUM_USERS, 4)
    lines = [f"Thread: {rng.choice(FORUM_TITLES)}", f"{users[0]}: {instruction()}"]
    for i in range(rng.randint(2, 4)):
        lines.append(f"{users[1 + i % 3]}: {rng.choice(FORUM_CHATTER)}")
    return "\n".join(lines)


def story(rng: random.Random, people: Cycle, sentences: Callable[[], lexicon.Sentence]) -> str:
    person = people.next()
    lines = [f"A day in {person.city}", person.fact("city"), person.fact("job")]
    for _ in range(rng.randint(2, 4)):
        lines.append(sentences().english())
    lines.append(rng.choice(RAMBLE[3:] + ["The end."]))
    return " ".join(lines[:1]) + "\n" + " ".join(lines[1:])


def documents(rng: random.Random, make: dict[str, Callable[[], str]],
              mix: dict[str, float] = MIX) -> Iterator[tuple[str, str]]:
    """An endless stream of (kind, text), kinds drawn so that token shares approach `mix`'s
    weights relative to their sum; a kind weighted 0 never comes. Kinds are taken in MIX's order,
    whatever the mapping's, so that the same weights always give the same corpus."""
    kinds = [k for k in MIX if mix.get(k, 0) > 0]
    produced = {k: 1.0 for k in kinds}
    while True:
        # Pick the kind furthest below its share: keeps the mix exact without knowing lengths.
        total = sum(produced.values())
        kind = min(kinds, key=lambda k: (produced[k] / total) / mix[k] + rng.random() * 1e-3)
        text = make[kind]()
        produced[kind] += approx_tokens(text)
        yield kind, text


_TOKEN_PATTERN = re.compile(r"\d|[^\W\d_]+|[^\w\s]")


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate of the token count: one per digit, word or punctuation mark."""
    return len(_TOKEN_PATTERN.findall(text))
