"""The simulated annotator: the score's order of priorities and its noise model."""

import random

import pytest

from stagewise.errors import StagewiseError
from stagewise.world import annotator, tasks
from stagewise.world.people import Person

PEOPLE = {"Lola": Person("Lola", "Brest", "baker", 34)}
PROMPT = "Where does Lola live?"


def score(response):
    return annotator.gold_score(PROMPT, response, PEOPLE)


def test_ideal_answer_scores_one_and_wrong_scores_low():
    assert score("Lola lives in Brest.") == pytest.approx(1.0)
    # wrong but concise and well formed: 0.3 + 0.1
    assert score("Lola lives in Lyon.") == pytest.approx(0.4)


def test_correctness_then_conciseness_then_form():
    ideal = score("Lola lives in Brest.")
    informal = score("Brest.")                      # correct, concise, not the ideal form
    rambling = score("Lola lives in Brest.\nI hope this helps! Let me know if you have any other questions.")
    wrong = score("Lola lives in Lyon.")
    assert ideal > informal > wrong
    assert ideal > rambling > wrong
    assert informal == pytest.approx(0.9)
    # rambling 13 words past the answer: 0.6 + 0.3 * exp(-13 / 8)
    assert rambling == pytest.approx(0.6 + 0.3 * 0.19691168, abs=1e-6)


def test_unknown_prompt_is_refused():
    with pytest.raises(StagewiseError, match="cannot judge"):
        score_prompt = annotator.gold_score("Tell me a joke.", "No.", PEOPLE)
        del score_prompt


def test_noisy_labels_follow_bradley_terry():
    rng = random.Random(0)
    p = annotator.preference_probability(1.0, 0.9)
    assert p == pytest.approx(1 / (1 + 2.718281828 ** -2), abs=1e-6)
    wins = sum(annotator.label_pair(1.0, 0.9, rng) for _ in range(20000))
    assert wins / 20000 == pytest.approx(p, abs=0.01)
    assert annotator.expected_agreement([(1.0, 0.9), (0.9, 1.0)]) == pytest.approx(p)


def test_a_noisy_ranking_orders_any_two_responses_as_a_noisy_comparison_does():
    rng = random.Random(0)
    firsts = sum(annotator.noisy_ranking([1.0, 0.9], rng)[0] == 0 for _ in range(20000))
    assert firsts / 20000 == pytest.approx(annotator.preference_probability(1.0, 0.9), abs=0.01)
    ranking = annotator.noisy_ranking([0.2, 1.0, 0.6, 0.9], rng)
    assert sorted(ranking) == [0, 1, 2, 3] and ranking[-1] == 0  # a gap of 0.4 or more: no noise in practice


def test_score_parts_are_in_range():
    example = tasks.facts(PEOPLE["Lola"], "age", 0)
    parts = annotator.score_parts(example, "Lola is 34 years old.")
    assert parts == {"correct": 1.0, "concise": 1.0, "form": 1.0}
