"""On-policy comparisons: a model's own sampled answers, labelled by the world's annotator.

InstructGPT's labellers ranked answers sampled from the model being aligned, and Llama 2's
preference data was collected round after round on the latest model: comparisons of a model's
own answers teach it about the mistakes it actually makes, which fixed pairs written in advance
do not. Here the simulated annotator plays the labeller. For each prompt the model samples
`samples` answers and the annotator ranks them with its usual noise (`annotator.noisy_ranking`);
the first and the last of the ranking make the prompt's one pair, as on-policy DPO recipes
binarise a scored group (SimPO pairs the highest-scored sample with the lowest). Taking every
differing pair instead made about three times as many pairs, many of them of two wrong answers,
for the same win rate over the SFT model (0.658 against 0.656 from one SFT model, default
preset) in 1.3 times the time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stagewise.eval import generate_answers
from stagewise.world import annotator
from stagewise.world.people import Person


@dataclass
class Comparisons:
    pairs: list[dict]  # {"prompt", "chosen", "rejected"}
    sample_score: float  # the annotator's mean score of every sampled answer
    samples: int


def label(prompts: list[str], answers: list[list[str]], people: dict[str, Person], rng: random.Random) -> Comparisons:
    """One pair per prompt: the best and the worst of its answers in the annotator's noisy
    ranking, when the annotator scores them differently and they differ."""
    pairs, scores_seen = [], []
    for prompt, candidates in zip(prompts, answers):
        example = annotator.example_for(prompt, people)
        scores = [annotator.score_example(example, a) for a in candidates]
        scores_seen += scores
        if len(set(scores)) < 2:
            continue
        ranking = annotator.noisy_ranking(scores, rng)
        best, worst = ranking[0], ranking[-1]
        if candidates[best] != candidates[worst]:
            pairs.append({"prompt": prompt, "chosen": candidates[best], "rejected": candidates[worst]})
    return Comparisons(pairs, sum(scores_seen) / max(len(scores_seen), 1), len(scores_seen))


def collect(model, tokenizer, prompts: list[str], people: dict[str, Person], *, samples: int, temperature: float,
            max_new_tokens: int, seed: int) -> Comparisons:
    """Sample `samples` answers to each of `prompts` from `model` (chat-rendered, batched as
    evaluation batches them) and have the annotator compare them."""
    out = generate_answers(model, tokenizer, [p for p in prompts for _ in range(samples)], chat=True,
                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    answers = [[text for text, *_ in out[i * samples:(i + 1) * samples]] for i in range(len(prompts))]
    return label(prompts, answers, people, random.Random(seed))
