"""Task checkers, prompt parsing and response styles, on hand-written cases."""

import json
import random

import pytest

from stagewise.world import tasks
from stagewise.world.people import Person

LOLA = Person("Lola", "Brest", "baker", 34)
PEOPLE = {"Lola": LOLA}


@pytest.mark.parametrize("response,ok", [
    ("Je mange la pomme rouge.", True),
    ("je mange la pomme rouge", True),            # case and final stop are normalised
    ("  Je mange   la pomme rouge.\nI hope this helps!", True),  # the answer is the first line
    ("Je mange la pomme.", False),
    ("Sure! Je mange la pomme rouge.", False),
    ("", False),
])
def test_translation_checker(response, ok):
    assert tasks.check("translate_en_fr", "Je mange la pomme rouge.", response) is ok


def test_french_spacing_before_question_mark_is_normalised():
    assert tasks.check("translate_en_fr", "Bonjour, comment allez-vous ?", "Bonjour, comment allez-vous?")


@pytest.mark.parametrize("response,ok", [
    ("23 + 45 = 68.", True), ("68", True), ("68.", True), ("23 + 45 = 68", True),
    ("23 + 45 = 67.", False), ("23 + 45", False), ("The answer is 68 or 69", False), ("45", False),
])
def test_arithmetic_checker(response, ok):
    assert tasks.check("arithmetic", "23 + 45 = 68.", response) is ok


@pytest.mark.parametrize("reference,response,ok", [
    ("Lola lives in Brest.", "Lola lives in Brest.", True),
    ("Lola lives in Brest.", "Brest.", True),
    ("Lola lives in Brest.", "Lola lives in Brest or Lyon.", False),   # hedging between two cities
    ("Lola lives in Brest.", "Lola lives in Lyon.", False),
    ("Lola lives in Brest.", "Lola lives in Lyon.\nBrest is nice.", False),  # only the first line counts
    ("Lola is a baker.", "Lola is a baker.", True),
    ("Lola is a baker.", "Lola is a cook.", False),
    ("Lola is 34 years old.", "Lola is 34 years old.", True),
    ("Lola is 34 years old.", "34", True),
    ("Lola is 34 years old.", "Lola is 43 years old.", False),
])
def test_facts_checker(reference, response, ok):
    assert tasks.check("facts", reference, response) is ok


def test_json_checker_and_format_validity():
    ref = '{"name": "Lola", "city": "Brest"}'
    assert tasks.check("json_record", ref, '{"name": "Lola", "city": "Brest"}')
    assert tasks.check("json_record", ref, 'Here is the record: {"city": "Brest", "name": "Lola"}')
    assert not tasks.check("json_record", ref, '{"name": "Lola", "city": "Lyon"}')
    assert not tasks.check("json_record", ref, '{"name": "Lola", "city": ')
    assert tasks.format_valid(ref, '{"name": "Lola", "city": "Brest"}')
    assert tasks.format_valid(ref, '{"name": "Zed", "city": "Lyon"}')  # valid form, wrong values
    assert not tasks.format_valid(ref, 'Here is the record: {"name": "Lola", "city": "Brest"}')
    assert not tasks.format_valid(ref, '{"name": "Lola", "city": "Brest", "age": 3}')
    assert not tasks.format_valid('{"name": "Lola", "age": 34}', '{"name": "Lola", "age": "34"}')


@pytest.mark.parametrize("reference,response,ok", [
    ("apple, cat, dog", "apple, cat, dog", True),
    ("apple, cat, dog", "apple cat dog.", True),
    ("apple, cat, dog", "cat, apple, dog", False),
    ("3", "3", True), ("3", "There are 3 words.", True), ("3", "4", False),
    ("APPLE CAT", "APPLE CAT", True), ("APPLE CAT", "apple cat", False), ("APPLE CAT", "APPLE", False),
])
def test_word_ops_checker(reference, response, ok):
    assert tasks.check("word_ops", reference, response) is ok


def test_solve_recovers_every_family():
    cases = [
        (tasks.translation("en_fr", ("Hello, how are you?", "Bonjour, comment allez-vous ?"), 0),
         "Bonjour, comment allez-vous ?"),
        (tasks.translation("fr_en", ("I eat the red apple.", "Je mange la pomme rouge."), 2), "I eat the red apple."),
        (tasks.arithmetic(7, 35, 1), "7 + 35 = 42."),
        (tasks.facts(LOLA, "job", 1), "Lola is a baker."),
        (tasks.json_record(LOLA, ["name", "age", "city"], 0), '{"name": "Lola", "age": 34, "city": "Brest"}'),
        (tasks.word_op("sort", ["dog", "apple", "cat"], 1), "apple, cat, dog"),
        (tasks.word_op("count", ["dog", "apple"], 0), "2"),
        (tasks.word_op("upper", ["dog", "apple"], 0), "DOG APPLE"),
    ]
    for example, reference in cases:
        assert example.reference == reference
        assert tasks.solve(example.prompt, PEOPLE) == example
    assert tasks.solve("Where does Nobody live?", PEOPLE) is None
    assert tasks.solve("Tell me a joke.", PEOPLE) is None


def test_styles_are_what_they_claim():
    rng = random.Random(0)
    pairs = [("We have a box.", "Nous avons une boîte.")]
    examples = [tasks.facts(LOLA, "city", 0), tasks.arithmetic(12, 30, 0),
                tasks.translation("en_fr", ("I eat the red apple.", "Je mange la pomme rouge."), 0),
                tasks.json_record(LOLA, ["name", "job"], 0), tasks.word_op("sort", ["dog", "cat", "bag"], 0),
                tasks.word_op("count", ["dog", "cat"], 0), tasks.word_op("upper", ["dog"], 0)]
    for e in examples:
        for style in tasks.STYLES:
            response = tasks.respond(e, style, rng, pairs)
            assert tasks.check(e.task, e.reference, response) is (style != "wrong"), (e, style, response)
            if style != "wrong":
                assert tasks.canonical_form(e.task, e.reference, response) is (style == "ideal"), (e, style)


def test_wrong_answers_come_in_every_form():
    rng = random.Random(1)
    e = tasks.arithmetic(12, 30, 0)
    forms = set()
    for _ in range(200):
        response = tasks.respond(e, "wrong", rng, [])
        assert not tasks.check(e.task, e.reference, response)
        forms.add("rambling" if "\n" in response else "ideal" if tasks.canonical_form(e.task, e.reference, response)
                  else "informal")
    assert forms == {"ideal", "informal", "rambling"}


def test_json_schema_matches_keys():
    schema = tasks.json_schema(["name", "age"])
    assert schema["required"] == ["name", "age"]
    assert schema["properties"]["age"] == {"type": "integer", "minimum": 0, "maximum": 120}
    assert schema["additionalProperties"] is False
    json.dumps(schema)
