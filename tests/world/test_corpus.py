"""Pre-training documents: JSON records teach copying the keys listed before them."""

import json
import random
import re

from stagewise.world import corpus
from stagewise.world.people import Person


def test_records_have_exactly_the_fields_listed_before_them_in_order():
    people = corpus.Cycle([Person("Malin", "Brest", "baker", 41), Person("Tosu", "Lyon", "nurse", 29)],
                          random.Random(0))
    lines = [line for seed in range(10) for line in
             corpus.json_records(random.Random(seed), people).splitlines()[1:]]
    assert len(lines) >= 20
    for line in lines:
        head, record = line.split(": ", 1)
        name, fields = head.split(", fields ")
        record = json.loads(record)
        assert list(record) == re.findall(r'"(\w+)"', fields)
        assert record["name"] == name

