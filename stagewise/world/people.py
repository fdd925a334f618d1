"""The world's people and their facts: each person has a city, a job and an age.

People are split in two: those that instruction and preference data may ask about, and a
held-out group whose facts are only ever stated in pre-training text. Evaluating `facts` on the
held-out group shows whether alignment unlocks knowledge that pre-training put in the weights.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CITIES = [
    "Brest", "Lyon", "Nantes", "Lille", "Dover", "York", "Leeds", "Bath",
    "Arles", "Metz", "Tours", "Rennes", "Derby", "Hull", "Oxford", "Cork",
]

JOBS = [
    "baker", "teacher", "doctor", "farmer", "painter", "nurse",
    "pilot", "singer", "driver", "cook", "writer", "tailor",
]

AGES = list(range(20, 80))

_ONSETS = ["b", "d", "f", "g", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u"]
_ENDINGS = ["", "", "n", "l", "r", "s"]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    age: int

    def fact(self, attribute: str) -> str:
        """The canonical sentence stating one fact; pre-training and answers share it."""
        if attribute == "city":
            return f"{self.name} lives in {self.city}."
        if attribute == "job":
            return f"{self.name} is a {self.job}."
        if attribute == "age":
            return f"{self.name} is {self.age} years old."
        raise ValueError(f"unknown attribute {attribute!r}")

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))

    def record(self, keys: list[str]) -> dict:
        return {key: getattr(self, key) for key in keys}


ATTRIBUTES = ("city", "job", "age")


def make_names(rng: random.Random, n: int, avoid: set[str]) -> list[str]:
    """n distinct two-syllable names such as "Malin" or "Tosu", none of them in `avoid`."""
    names: list[str] = []
    seen = {w.lower() for w in avoid}
    while len(names) < n:
        name = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS)
                + rng.choice(_VOWELS) + rng.choice(_ENDINGS)).capitalize()
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return names


def make_people(rng: random.Random, n: int, avoid: set[str]) -> list[Person]:
    names = make_names(rng, n, avoid)
    return [Person(name, rng.choice(CITIES), rng.choice(JOBS), rng.choice(AGES)) for name in names]
