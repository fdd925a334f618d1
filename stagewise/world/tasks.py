"""The six task families: how their prompts are worded, their ideal answers, and their checkers.

Every family has prompt templates, an ideal ("reference") answer worded the way pre-training
text words it (so that alignment can reuse pre-trained knowledge), response styles of mixed
quality for demonstration and preference data, and a checker.

Checkers judge the *answer*: the first non-empty line of a response. Normalisation, shared by
the families that compare text: surrounding whitespace stripped, runs of whitespace collapsed,
spaces before punctuation removed (French "vous ?" equals "vous?"), one trailing full stop
dropped, and case folded, except for `word_ops` uppercase answers where case is the point.
- translate_en_fr, translate_fr_en: the normalised answer equals the normalised reference.
- arithmetic: the integer after the last "=" of the answer, or the answer alone when it is a
  bare integer, equals the sum.
- facts: the answer names the asked value (a city, a job, an age) and no other value of that kind.
- json_record: the first {...} object in the answer parses and equals the reference record.
- word_ops: sort and uppercase compare the word sequence; count compares the last integer.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from stagewise.world import lexicon
from stagewise.world.people import ATTRIBUTES, CITIES, JOBS, Person

TASKS = ("translate_en_fr", "translate_fr_en", "arithmetic", "facts", "json_record", "word_ops")

TEMPLATES = {
    "translate_en_fr": [
        "Translate the following sentence into French: {text}",
        "Translate into French: {text}",
        "How do you say this in French? {text}",
    ],
    "translate_fr_en": [
        "Translate the following sentence into English: {text}",
        "Translate into English: {text}",
        "What does this mean in English? {text}",
    ],
    "arithmetic": [
        "What is {a} + {b}?",
        "Add {a} and {b}.",
        "Compute {a} + {b}.",
    ],
    "facts/city": ["Where does {name} live?", "In which city does {name} live?"],
    "facts/job": ["What is {name}'s job?", "What does {name} do for a living?"],
    "facts/age": ["How old is {name}?", "What is the age of {name}?"],
    "json_record": [
        "Give the record of {name} as JSON with the keys {keys}.",
        "Return a JSON object for {name} with the keys {keys}.",
    ],
    "word_ops/sort": ["Sort these words alphabetically: {words}.", "Put these words in alphabetical order: {words}."],
    "word_ops/count": ["How many words are in this list: {words}?", "Count the words: {words}."],
    "word_ops/upper": ["Write these words in uppercase: {words}.", "Capitalise every letter: {words}."],
}

# The pool of words for word_ops: English nouns and adjectives of the phrase book.
WORDS = sorted({n[0] for n in lexicon.NOUNS} | {a[0] for a in lexicon.ADJECTIVES})

# Chatter that rambles past an answer. None of it names a city, job or number of the world.
RAMBLE = [
    "I hope this helps!",
    "Let me know if you have any other questions.",
    "I am doing well, thank you for asking.",
    "The weather is nice today.",
    "Practice makes perfect, so keep going.",
    "That was a fun one to think about.",
    "Feel free to ask me anything else.",
    "I like questions like this one.",
    "Have a wonderful afternoon.",
    "Learning new things every day is important.",
]

STYLES = ("ideal", "informal", "rambling", "wrong")


@dataclass(frozen=True)
class Example:
    """One instruction: its family, the prompt a user types, and the ideal answer."""

    task: str
    prompt: str
    reference: str


# ----------------------------------------------------------------------------- building prompts

def translation(direction: str, sentence: tuple[str, str], template: int) -> Example:
    """`sentence` is an (english, french) pair; `direction` is en_fr or fr_en."""
    en, fr = sentence
    task = f"translate_{direction}"
    source, target = (en, fr) if direction == "en_fr" else (fr, en)
    return Example(task, TEMPLATES[task][template].format(text=source), target)


def arithmetic(a: int, b: int, template: int) -> Example:
    return Example("arithmetic", TEMPLATES["arithmetic"][template].format(a=a, b=b), f"{a} + {b} = {a + b}.")


def facts(person: Person, attribute: str, template: int) -> Example:
    prompt = TEMPLATES[f"facts/{attribute}"][template].format(name=person.name)
    return Example("facts", prompt, person.fact(attribute))


def json_record(person: Person, keys: list[str], template: int) -> Example:
    # Keys are quoted as the record quotes them, so the prompt spells them in the answer's tokens.
    quoted = [f'"{k}"' for k in keys]
    listed = ", ".join(quoted[:-1]) + " and " + quoted[-1] if len(keys) > 1 else quoted[0]
    prompt = TEMPLATES["json_record"][template].format(name=person.name, keys=listed)
    return Example("json_record", prompt, json.dumps(person.record(keys), ensure_ascii=False))


def word_op(op: str, words: list[str], template: int) -> Example:
    if op == "count":
        shown, answer = ", ".join(words), str(len(words))
    elif op == "sort":
        shown, answer = ", ".join(words), ", ".join(sorted(words))
    elif op == "upper":
        shown, answer = " ".join(words), " ".join(w.upper() for w in words)
    else:
        raise ValueError(f"unknown word operation {op!r}")
    return Example("word_ops", TEMPLATES[f"word_ops/{op}"][template].format(words=shown), answer)


FIELD_SCHEMAS = {
    "name": {"type": "string", "minLength": 1, "maxLength": 16},
    "city": {"type": "string", "minLength": 1, "maxLength": 16},
    "job": {"type": "string", "minLength": 1, "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
}


def json_schema(keys: list[str]) -> dict:
    """The JSON schema a json_record answer must satisfy: exactly these keys, typed and bounded
    as a record of the world is (bounds also keep constrained decoding from running on)."""
    return {
        "type": "object",
        "properties": {k: FIELD_SCHEMAS[k] for k in keys},
        "required": list(keys),
        "additionalProperties": False,
    }


# ----------------------------------------------------------------------------- parsing prompts

def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for field, group in (("text", r"(?P<text>.+)"), ("a", r"(?P<a>\d+)"), ("b", r"(?P<b>\d+)"),
                         ("name", r"(?P<name>[A-Z][a-z]+)"), ("keys", r"(?P<keys>[a-z, \"]+?)"),
                         ("words", r"(?P<words>[a-z, ]+?)")):
        pattern = pattern.replace(re.escape("{" + field + "}"), group)
    return re.compile(pattern + r"\Z", re.DOTALL)


_PARSERS = [(key, i, _template_regex(t)) for key, templates in TEMPLATES.items() for i, t in enumerate(templates)]


def parse_prompt(prompt: str) -> tuple[str, int, dict] | None:
    """Which template produced `prompt` ("facts/city", its index) and its fields, or None."""
    prompt = prompt.strip()
    for key, index, regex in _PARSERS:
        match = regex.match(prompt)
        if match:
            return key, index, match.groupdict()
    return None


# ----------------------------------------------------------------------------- checking answers

def answer_line(response: str) -> str:
    """The answer part of a response: its first non-empty line."""
    for line in response.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalise(text: str, fold_case: bool = True) -> str:
    text = re.sub(r"\s+", " ", text.strip())
    text = re.sub(r" ([?!.,:;])", r"\1", text)
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    return text.casefold() if fold_case else text


def _integers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _fact_value(reference: str) -> tuple[str, str]:
    for attribute, regex in (("city", r"lives in (\w+)\.$"), ("age", r"is (\d+) years old\.$"),
                             ("job", r"is an? (\w+)\.$")):
        match = re.search(regex, reference)
        if match:
            return attribute, match.group(1)
    raise ValueError(f"not a fact sentence: {reference!r}")


def _first_json_object(text: str):
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _word_sequence(text: str) -> list[str]:
    return re.findall(r"[^\s,.;:]+", text)


def check(task: str, reference: str, response: str) -> bool:
    """Is `response` a correct answer? The rules per family are in the module docstring."""
    answer = answer_line(response)
    if not answer:
        return False
    if task in ("translate_en_fr", "translate_fr_en"):
        return normalise(answer) == normalise(reference)
    if task == "arithmetic":
        expected = _integers(reference)[-1]
        if "=" in answer:
            got = _integers(answer.rsplit("=", 1)[1])
            return bool(got) and got[0] == expected
        return re.fullmatch(r"-?\d+\.?", answer) is not None and _integers(answer)[0] == expected
    if task == "facts":
        attribute, value = _fact_value(reference)
        if attribute == "age":
            return _integers(answer) == [int(value)]
        candidates = CITIES if attribute == "city" else JOBS
        named = {c for c in candidates if re.search(rf"\b{re.escape(c)}\b", answer)}
        return named == {value}
    if task == "json_record":
        return _first_json_object(answer) == json.loads(reference)
    if task == "word_ops":
        if reference.isdigit():
            got = _integers(answer)
            return bool(got) and got[-1] == int(reference)
        fold = not reference.isupper()
        words = [w.casefold() if fold else w for w in _word_sequence(answer)]
        return words == [w.casefold() if fold else w for w in _word_sequence(reference)]
    raise ValueError(f"unknown task {task!r}")


def format_valid(reference: str, response: str) -> bool:
    """json_record only: the whole response is a JSON object with exactly the requested keys,
    of the requested types (the schema of `json_schema`)."""
    expected = json.loads(reference)
    try:
        value = json.loads(response.strip())
    except json.JSONDecodeError:
        return False
    if not isinstance(value, dict) or list(value) != list(expected):
        return False
    return all(_fits(value[k], FIELD_SCHEMAS[k]) for k in value)


def _fits(value, schema: dict) -> bool:
    if schema["type"] == "integer":
        return isinstance(value, int) and not isinstance(value, bool) and \
            schema["minimum"] <= value <= schema["maximum"]
    return isinstance(value, str) and schema["minLength"] <= len(value) <= schema["maxLength"]


def attempts_answer(task: str, reference: str, response: str) -> bool:
    """Does the response try to answer (rightly or wrongly) rather than continue the text?

    A correct answer does. Otherwise the answer line has to have the shape of an answer of its
    family: mostly French (or English) phrase-book words for a translation, a sum or a number
    for arithmetic, a short line naming a city, job or age for facts, a JSON object for
    json_record, the listed words or a count for word_ops. Forum chatter, a restated question
    or a new instruction does not. `continuation_rate` counts the responses that do not.
    """
    if check(task, reference, response):
        return True
    line = answer_line(response)
    words = re.findall(r"[^\W\d_]+", line.casefold())
    if not line:
        return False
    if task in ("translate_en_fr", "translate_fr_en"):
        known = lexicon.french_words() if task == "translate_en_fr" else lexicon.english_words()
        return bool(words) and sum(w in known for w in words) / len(words) >= 0.6
    if task == "arithmetic":
        return re.fullmatch(r"(\d+ \+ \d+ = )?-?\d+\.?", line) is not None
    if task == "facts":
        names_value = any(re.search(rf"\b{re.escape(v)}\b", line) for v in CITIES + JOBS) or \
            re.search(r"\b\d+ years old\b|^\d+\.?$", line) is not None
        return names_value and len(words) <= 8
    if task == "json_record":
        return line.startswith("{")
    if task == "word_ops":
        if reference.isdigit():
            return bool(_integers(line)) and len(words) <= 5
        pool = {w.casefold() for w in WORDS}
        return bool(words) and sum(w in pool for w in words) / len(words) >= 0.6
    raise ValueError(f"unknown task {task!r}")


def canonical_form(task: str, reference: str, response: str) -> bool:
    """Is the response shaped like the ideal answer (right or wrong)? The annotator's 'form'."""
    text = response.strip()
    if "\n" in text:
        return False
    if task in ("translate_en_fr", "translate_fr_en"):
        return bool(re.fullmatch(r"[A-ZÀ-Ý].*[.?!]", text))
    if task == "arithmetic":
        return bool(re.fullmatch(r"\d+ \+ \d+ = \d+\.", text))
    if task == "facts":
        name = reference.split(" ", 1)[0]
        return bool(re.fullmatch(rf"{re.escape(name)} (lives in [A-Z]\w+|is an? [a-z]+|is \d+ years old)\.", text))
    if task == "json_record":
        return format_valid(reference, text)
    if task == "word_ops":
        if reference.isdigit():
            return text.isdigit()
        separator = ", " if ", " in reference else " "
        return separator.join(_word_sequence(text)) == text
    raise ValueError(f"unknown task {task!r}")


# ----------------------------------------------------------------------------- response styles

def informal(example: Example) -> str:
    """A correct answer in a looser form than the ideal one."""
    task, ref = example.task, example.reference
    if task in ("translate_en_fr", "translate_fr_en"):
        return ref.rstrip(".?! ").lower()
    if task == "arithmetic":
        return str(_integers(ref)[-1])
    if task == "facts":
        return _fact_value(ref)[1].capitalize() + "."
    if task == "json_record":
        return f"Here is the record: {ref}"
    if ref.isdigit():
        return f"There are {ref} words."
    return " ".join(_word_sequence(ref)) + "."


def wrong(example: Example, rng: random.Random, sentence_pairs: list[tuple[str, str]]) -> str:
    """A plausible answer in the ideal form that is not correct."""
    task, ref = example.task, example.reference
    if task in ("translate_en_fr", "translate_fr_en"):
        pair = rng.choice(sentence_pairs)
        answer = pair[1] if task == "translate_en_fr" else pair[0]
        return answer if normalise(answer) != normalise(ref) else wrong(example, rng, sentence_pairs)
    if task == "arithmetic":
        a, b, c = _integers(ref)
        return f"{a} + {b} = {c + rng.choice([-10, -2, -1, 1, 2, 10])}."
    if task == "facts":
        attribute, value = _fact_value(ref)
        if attribute == "age":
            return ref.replace(f" {value} ", f" {int(value) + rng.choice([-3, -1, 1, 3])} ")
        choices = [c for c in (CITIES if attribute == "city" else JOBS) if c != value]
        return ref.replace(value, rng.choice(choices))
    if task == "json_record":
        record = json.loads(ref)
        key = rng.choice([k for k in record if k != "name"] or ["name"])
        if key == "age":
            record[key] += rng.choice([-2, 1, 4])
        elif key == "city":
            record[key] = rng.choice([c for c in CITIES if c != record[key]])
        elif key == "job":
            record[key] = rng.choice([j for j in JOBS if j != record[key]])
        else:
            record[key] = record[key][::-1].capitalize()
        return json.dumps(record, ensure_ascii=False)
    if ref.isdigit():
        return str(int(ref) + rng.choice([-1, 1]))
    words = _word_sequence(ref)
    if len(words) > 1:
        words = words[1:] + words[:1]
    else:
        words = [rng.choice([w for w in WORDS if w.upper() != words[0]]).upper()]
    return (", " if ", " in ref else " ").join(words)


def respond(example: Example, style: str, rng: random.Random, sentence_pairs: list[tuple[str, str]]) -> str:
    """A response to `example` in one of STYLES."""
    if style == "ideal":
        return example.reference
    if style == "informal":
        return informal(example)
    if style == "rambling":
        return example.reference + "\n" + " ".join(rng.sample(RAMBLE, rng.randint(1, 3)))
    if style == "wrong":
        # Wrong answers come in every form that right ones do, so that form never tells a
        # reward model whether an answer is right: half in the ideal form, a quarter informal,
        # a quarter rambling.
        answer = wrong(example, rng, sentence_pairs)
        form = rng.random()
        if form < 0.25:
            return informal(Example(example.task, example.prompt, answer))
        if form < 0.5:
            return answer + "\n" + " ".join(rng.sample(RAMBLE, rng.randint(1, 3)))
        return answer
    raise ValueError(f"unknown style {style!r}")


def solve(prompt: str, people: dict[str, Person]) -> Example | None:
    """The ideal answer to any prompt the world's templates can produce, or None."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        return None
    key, template, fields = parsed
    if key in ("translate_en_fr", "translate_fr_en"):
        return _solve_translation(key, fields["text"], template)
    if key == "arithmetic":
        return arithmetic(int(fields["a"]), int(fields["b"]), template)
    if key.startswith("facts/"):
        person = people.get(fields["name"])
        return facts(person, key.split("/")[1], template) if person else None
    if key == "json_record":
        person = people.get(fields["name"])
        keys = [k.strip('"') for k in re.split(r", | and ", fields["keys"])]
        if person is None or any(k not in ("name",) + ATTRIBUTES for k in keys):
            return None
        return json_record(person, keys, template)
    op = key.split("/")[1]
    words = _word_sequence(fields["words"])
    return word_op(op, words, template)


_EN_TO_FR: dict[str, str] = {}
_FR_TO_EN: dict[str, str] = {}


def _solve_translation(task: str, text: str, template: int) -> Example | None:
    if not _EN_TO_FR:
        for s in _all_sentences():
            _EN_TO_FR[normalise(s.english())] = s.french()
            _FR_TO_EN[normalise(s.french())] = s.english()
        for en, fr in lexicon.FIXED_PHRASES:
            _EN_TO_FR[normalise(en)] = fr
            _FR_TO_EN[normalise(fr)] = en
    table = _EN_TO_FR if task == "translate_en_fr" else _FR_TO_EN
    target = table.get(normalise(text))
    if target is None:
        return None
    pair = (text, target) if task == "translate_en_fr" else (target, text)
    return translation(task.removeprefix("translate_"), pair, template)


def _all_sentences():
    """Every sentence the phrase-book grammar can compose."""
    for subject in range(len(lexicon.SUBJECTS)):
        for verb in range(len(lexicon.VERBS)):
            for det in range(len(lexicon.DETERMINERS)):
                for noun in range(len(lexicon.NOUNS)):
                    for adj in range(-1, len(lexicon.ADJECTIVES)):
                        for time in range(-1, len(lexicon.TIMES)):
                            yield lexicon.Sentence(subject, verb, det, noun, adj, time)
