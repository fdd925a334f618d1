"""The simulated annotator: a deterministic gold score, and noisy preference labels drawn from it.

    gold_score = 0.6 * correct + 0.3 * concise + 0.1 * form

- correct (0 or 1): the family's checker (`tasks.check`) passes.
- concise (0..1): exp(-extra / 8), where `extra` is the number of words the response has beyond
  the ideal answer; answering and stopping scores 1, rambling past the answer decays.
- form (0 or 1): the response is shaped like the ideal answer (`tasks.canonical_form`): a full
  sentence for facts, "a + b = c." for arithmetic, a capitalised and punctuated sentence for
  translations, bare JSON with exactly the requested keys, one line.

The weights make the order lexicographic in spirit: any correct answer beats any wrong one
(0.6 > 0.3 + 0.1), and a concise answer beats a rambling one of the same correctness by more
than form can make up, unless the rambling is a word or two.

Preference labels follow a Bradley-Terry model of a noisy annotator: response a is preferred
with probability sigmoid((gold(a) - gold(b)) / TEMPERATURE). With TEMPERATURE = 0.05 the labels
agree with the noiseless ordering on about 97 pairs in 100 for the world's mix of styles, and
less often on close pairs (an ideal answer against an informal one: about 88 in 100).
`noisy_ranking` orders a group of responses with the same noise, as a labeller ranking several
samples at once does. `expected_agreement` gives the exact rate for a set of pairs; `stagewise
data` prints it beside the measured one. A reward model learnt from these labels is a proxy of
the annotator, never a copy.
"""

from __future__ import annotations

import math
import random

from stagewise.errors import StagewiseError
from stagewise.world import tasks
from stagewise.world.people import Person

WEIGHTS = {"correct": 0.6, "concise": 0.3, "form": 0.1}
CONCISENESS_SCALE = 8.0
TEMPERATURE = 0.05


def _n_words(text: str) -> int:
    return len(text.split())


def score_parts(example: tasks.Example, response: str) -> dict[str, float]:
    """The three components of the gold score for a response to a known example."""
    extra = max(0, _n_words(response) - _n_words(example.reference))
    return {
        "correct": float(tasks.check(example.task, example.reference, response)),
        "concise": math.exp(-extra / CONCISENESS_SCALE),
        "form": float(tasks.canonical_form(example.task, example.reference, response)),
    }


def score_example(example: tasks.Example, response: str) -> float:
    parts = score_parts(example, response)
    return sum(WEIGHTS[k] * v for k, v in parts.items())


def example_for(prompt: str, people: dict[str, Person]) -> tasks.Example:
    """The world's example behind `prompt`; refused when the prompt is not one the annotator
    can judge. `people` is the world's people by name (for questions about them)."""
    example = tasks.solve(prompt, people)
    if example is None:
        raise StagewiseError(f"the simulated annotator cannot judge this prompt (not from the embedded world): {prompt!r}")
    return example


def gold_score(prompt: str, response: str, people: dict[str, Person]) -> float:
    """The annotator's score of `response` to `prompt`, in [0, 1]."""
    return score_example(example_for(prompt, people), response)


def preference_probability(score_a: float, score_b: float) -> float:
    """Probability that the noisy annotator prefers a over b."""
    return 1.0 / (1.0 + math.exp(-(score_a - score_b) / TEMPERATURE))


def label_pair(score_a: float, score_b: float, rng: random.Random) -> bool:
    """True when the noisy annotator prefers a."""
    return rng.random() < preference_probability(score_a, score_b)


def noisy_ranking(scores: list[float], rng: random.Random) -> list[int]:
    """The annotator ranking several responses at once, best first: each score plus Gumbel
    noise of scale TEMPERATURE (a Plackett-Luce ranking). Any two responses come out in the
    order `label_pair` would give them with the same probability, so ranking is the same
    noisy annotator as comparing, asked about a whole group."""
    gumbel = [-math.log(rng.expovariate(1.0) or 1e-300) for _ in scores]  # -log of Exp(1) is Gumbel(0, 1)
    noisy = [s + TEMPERATURE * g for s, g in zip(scores, gumbel)]
    return sorted(range(len(scores)), key=lambda i: -noisy[i])


def expected_agreement(score_pairs: list[tuple[float, float]]) -> float:
    """The rate at which noisy labels agree with the noiseless order, on pairs of unequal score."""
    rates = [max(p, 1 - p) for p in (preference_probability(a, b) for a, b in score_pairs if a != b)]
    return sum(rates) / len(rates)
