"""On-policy comparisons: a model's own sampled answers, labelled by the world's annotator.

InstructGPT's labellers ranked answers sampled from the model being aligned, and Llama 2's
preference data was collected round after round on the latest model: comparisons of a model's
own answers teach it about the mistakes it actually makes, which fixed pairs written in advance
do not. Here the simulated annotator plays the labeller. For each prompt the model samples
`samples` answers; every two answers that differ and that the annotator scores differently make
a pair, its order drawn with the annotator's noise (`annotator.label_pair`), exactly as the
world's fixed preference pairs are labelled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from stagewise import engine
from stagewise.errors import StagewiseError
from stagewise.world import annotator, tasks
from stagewise.world.people import Person


@dataclass
class Comparisons:
    pairs: list[dict]  # {"prompt", "chosen", "rejected"}
    sample_score: float  # the annotator's mean score of every sampled answer
    samples: int


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, samples: int, temperature: float, max_new_tokens: int,
           seed: int, batch_size: int = 256) -> list[list[str]]:
    """`samples` answers to each prompt (chat-rendered), sampled in batches of similar length."""
    stop = [tokenizer.im_end_id, tokenizer.endoftext_id]
    rendered = [tokenizer.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(rendered[i]))
    per_batch = max(1, batch_size // samples)
    answers: list[list[str]] = [[] for _ in prompts]
    model.eval()
    for start in range(0, len(order), per_batch):
        chunk = order[start:start + per_batch]
        ids = [rendered[i] for i in chunk for _ in range(samples)]
        room = min(max_new_tokens, model.cfg.max_seq_len - max(len(p) for p in ids))
        if room < 1:
            raise StagewiseError(f"on-policy sampling: a prompt of {max(len(p) for p in ids)} tokens fills the context")
        out = engine.generate(model, ids, max_new_tokens=room, temperature=temperature, stop_ids=stop,
                              seed=seed + start)
        for j, i in enumerate(chunk):
            answers[i] = [tokenizer.decode(r[:-1] if r and r[-1] in stop else r)
                          for r in out[j * samples:(j + 1) * samples]]
    return answers


def label(prompts: list[str], answers: list[list[str]], people: dict[str, Person], rng: random.Random) -> Comparisons:
    """Pairs of each prompt's answers that differ and score differently, ordered by the noisy annotator."""
    pairs, scores_seen = [], []
    for prompt, candidates in zip(prompts, answers):
        example = tasks.solve(prompt, people)
        if example is None:
            raise StagewiseError(f"the simulated annotator cannot judge this prompt (not from the embedded world): "
                                 f"{prompt!r}")
        scores = [annotator.score_example(example, a) for a in candidates]
        scores_seen += scores
        for a in range(len(candidates)):
            for b in range(a + 1, len(candidates)):
                if candidates[a] == candidates[b] or scores[a] == scores[b]:
                    continue
                first = annotator.label_pair(scores[a], scores[b], rng)
                chosen, rejected = (a, b) if first else (b, a)
                pairs.append({"prompt": prompt, "chosen": candidates[chosen], "rejected": candidates[rejected]})
    return Comparisons(pairs, sum(scores_seen) / max(len(scores_seen), 1), len(scores_seen))


def collect(model, tokenizer, prompts: list[str], people: dict[str, Person], *, samples: int, temperature: float,
            max_new_tokens: int, seed: int) -> Comparisons:
    """Sample answers to `prompts` from `model` and have the annotator compare them."""
    answers = sample(model, tokenizer, prompts, samples=samples, temperature=temperature,
                     max_new_tokens=max_new_tokens, seed=seed)
    return label(prompts, answers, people, random.Random(seed))
