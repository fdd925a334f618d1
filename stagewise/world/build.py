"""Assemble the embedded world into its data sets and write them as JSONL.

Held-out material is chosen first and reserved: evaluation sentences (in both languages),
addition pairs and word lists never appear in any training text, and the held-out people's
facts appear only in pre-training text, never in instruction or preference data. Instruction
(SFT) prompts and preference prompts are disjoint. Each product draws from its own random
stream, so changing the size of one leaves the others as they were.

Demonstrations are of mixed quality, as real ones are (`SFT_STYLES`): most ideal, some correct
but informal, some rambling past the answer, a few wrong.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from stagewise.errors import StagewiseError
from stagewise.world import annotator, corpus, lexicon, tasks
from stagewise.world.people import ATTRIBUTES, CITIES, JOBS, Person, make_people

# Share of each response style among SFT demonstrations.
SFT_STYLES = {"ideal": 0.62, "informal": 0.14, "rambling": 0.16, "wrong": 0.08}
SEED_PROMPT = tasks.TEMPLATES["translate_en_fr"][0].format(text=lexicon.SEED_PHRASE[0])
SEED_REFERENCE = lexicon.SEED_PHRASE[1]


@dataclass
class DataConfig:
    seed: int = 7
    n_people: int = 1000
    n_heldout_people: int = 200  # asked about only in evaluation
    pretrain_tokens: int = 5_000_000  # approximate, see corpus.approx_tokens
    heldout_text_tokens: int = 50_000
    n_sft: int = 40_000
    n_preferences: int = 48_000
    n_heldout_preferences: int = 1_000
    n_ppo_prompts: int = 4_000
    n_eval_per_task: int = 200
    # The seed prompt is a named probe that SFT data may contain. Its answer ends "vous ?", and
    # informal translations drop the final "?": with 8 copies the SFT model's greedy answer lost
    # the " ?" in one run of three ("vous " 0.46 against "v" 0.52); with 16 it took "vous " at 0.98.
    seed_probe_copies: int = 16
    paraphrase_rate: float = 0.15  # share of biography sentences not in the canonical wording
    fixed_phrase_rate: float = 0.1  # share of phrase-book entries that are fixed phrases
    # Share of each task family among instruction and preference prompts. Translation is mostly
    # learnt from the phrase book in pre-training and needs fewer demonstrations than json_record
    # and word_ops, whose answers are built from the prompt rather than recalled. On one base
    # model, SFT with json_record and word_ops at 1.4 (translation 0.7, the others 1.0) copied the
    # requested keys and words less often: json_record 0.419 and word_ops 0.68, against 0.737 and
    # 0.76 with these weights, the other families within 0.02.
    task_weights: dict[str, float] = field(default_factory=lambda: {
        "translate_en_fr": 0.6, "translate_fr_en": 0.6, "arithmetic": 0.8, "facts": 0.8, "json_record": 2.0,
        "word_ops": 2.0})
    # Weight of each kind of pre-training document, relative to their sum, by approximate tokens
    # (`corpus.MIX`, where the kinds are described); 0 leaves a kind out.
    corpus_mix: dict[str, float] = field(default_factory=lambda: dict(corpus.MIX))

    def __post_init__(self):
        unknown = sorted(set(self.corpus_mix) - set(corpus.MIX))
        if unknown:
            raise StagewiseError(f"corpus_mix: unknown document kind {unknown[0]!r}; kinds are "
                                 f"{', '.join(corpus.MIX)}")
        if any(w < 0 for w in self.corpus_mix.values()) or not any(w > 0 for w in self.corpus_mix.values()):
            raise StagewiseError("corpus_mix: weights must be 0 or more, and at least one above 0")


@dataclass
class World:
    """The sampled world and its reservations; everything else is drawn from it."""

    config: DataConfig
    people: list[Person]
    heldout_names: set[str]
    eval_examples: list[tasks.Example]
    reserved_sentences: set[lexicon.Sentence]
    reserved_pairs: set[tuple[int, int]]
    reserved_words: set[tuple[str, ...]]

    @property
    def people_by_name(self) -> dict[str, Person]:
        return {p.name: p for p in self.people}

    @property
    def train_people(self) -> list[Person]:
        return [p for p in self.people if p.name not in self.heldout_names]

    def gold_score(self, prompt: str, response: str) -> float:
        return annotator.gold_score(prompt, response, self.people_by_name)


def stream(config: DataConfig, name: str) -> random.Random:
    return random.Random(f"{config.seed}/{name}")


def _lexicon_words() -> set[str]:
    return lexicon.english_words() | lexicon.french_words() | set(CITIES) | set(JOBS) | set(tasks.WORDS)


def make_world(config: DataConfig) -> World:
    if config.n_heldout_people >= config.n_people:
        raise ValueError("n_heldout_people must be smaller than n_people")
    rng = stream(config, "world")
    people = make_people(rng, config.n_people, _lexicon_words())
    heldout = people[-config.n_heldout_people:]
    n = config.n_eval_per_task

    sentences: list[lexicon.Sentence] = []
    seen: set[lexicon.Sentence] = set()
    while len(sentences) < 2 * n:
        s = lexicon.random_sentence(rng)
        if s not in seen:
            seen.add(s)
            sentences.append(s)
    examples = [tasks.translation("en_fr", (s.english(), s.french()), rng.randrange(3)) for s in sentences[:n]]
    examples += [tasks.translation("fr_en", (s.english(), s.french()), rng.randrange(3)) for s in sentences[n:]]

    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        pair = (rng.randint(10, 99), rng.randint(10, 99))
        if pair not in pairs:
            pairs.append(pair)
    examples += [tasks.arithmetic(a, b, rng.randrange(3)) for a, b in pairs]

    asked = [(p, a) for p in heldout for a in ATTRIBUTES]
    rng.shuffle(asked)
    examples += [tasks.facts(p, a, rng.randrange(2)) for p, a in (asked * (n // len(asked) + 1))[:n]]
    examples += [json_example(rng, rng.choice(heldout)) for _ in range(n)]

    word_lists: list[tuple[str, ...]] = []
    ops = ["sort", "count", "upper"]
    while len(word_lists) < n:
        words = tuple(_words_for(ops[len(word_lists) % 3], rng))
        if words not in word_lists:
            word_lists.append(words)
    examples += [tasks.word_op(ops[i % 3], list(w), rng.randrange(2)) for i, w in enumerate(word_lists)]

    return World(config, people, {p.name for p in heldout}, _dedupe(examples), set(sentences), set(pairs),
                 set(word_lists))


def _dedupe(examples: list[tasks.Example]) -> list[tasks.Example]:
    seen, out = set(), []
    for e in examples:
        if e.prompt not in seen:
            seen.add(e.prompt)
            out.append(e)
    return out


def _words_for(op: str, rng: random.Random) -> list[str]:
    k = {"sort": 3, "count": rng.randint(2, 7), "upper": rng.randint(1, 3)}[op]
    return rng.sample(tasks.WORDS, k)


def json_example(rng: random.Random, person: Person) -> tasks.Example:
    keys = list(ATTRIBUTES)
    rng.shuffle(keys)
    return tasks.json_record(person, ["name"] + keys[: rng.randint(1, 3)], rng.randrange(2))


class TrainingPrompts:
    """Draws instructions for training data, never a reserved one. The facts questions about
    training people are split once between SFT and preference data, so that their prompts are
    disjoint by construction; other families are kept disjoint by rejection in `build`."""

    def __init__(self, world: World, split: str):
        self.world = world
        rng = stream(world.config, "facts-split")
        questions = [(p, a, t) for p in world.train_people for a in ATTRIBUTES for t in range(2)]
        rng.shuffle(questions)
        cut = int(0.7 * len(questions))
        self.questions = questions[:cut] if split == "sft" else questions[cut:]

    def sentence(self, rng: random.Random) -> lexicon.Sentence:
        while True:
            s = lexicon.random_sentence(rng)
            if s not in self.world.reserved_sentences:
                return s

    def example(self, task: str, rng: random.Random) -> tasks.Example:
        if task in ("translate_en_fr", "translate_fr_en"):
            if rng.random() < 0.1:
                pair = rng.choice(lexicon.FIXED_PHRASES)
            else:
                s = self.sentence(rng)
                pair = (s.english(), s.french())
            return tasks.translation(task.removeprefix("translate_"), pair, rng.randrange(3))
        if task == "arithmetic":
            while True:
                a, b = _training_operands(rng)
                if (a, b) not in self.world.reserved_pairs:
                    return tasks.arithmetic(a, b, rng.randrange(3))
        if task == "facts":
            person, attribute, template = rng.choice(self.questions)
            return tasks.facts(person, attribute, template)
        if task == "json_record":
            return json_example(rng, rng.choice(self.world.train_people))
        if task == "word_ops":
            op = rng.choice(["sort", "count", "upper"])
            while True:
                words = _words_for(op, rng)
                if tuple(words) not in self.world.reserved_words:
                    return tasks.word_op(op, words, rng.randrange(2))
        raise ValueError(f"unknown task {task!r}")


def _training_operands(rng: random.Random) -> tuple[int, int]:
    """Mostly two-digit additions, with some one- and three-digit operands that pre-training
    never shows, so that answering has to copy from the prompt rather than recall a worksheet."""
    r = rng.random()
    if r < 0.8:
        return rng.randint(0, 99), rng.randint(0, 99)
    if r < 0.9:
        return rng.randint(0, 9), rng.randint(0, 99)
    return rng.randint(100, 999), rng.randint(0, 99)


def _draw_task(rng: random.Random, weights: dict[str, float]) -> str:
    # In sorted order, whatever the mapping's: the stages rebuild the world from its config's
    # JSON with sorted keys (`common.world_data`), `stagewise data` from the config as given, and
    # both must draw the same prompts.
    names = sorted(weights)
    return rng.choices(names, [weights[n] for n in names])[0]


def _sentence_pairs(rng: random.Random, n: int = 500) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(n):
        s = lexicon.random_sentence(rng)
        pairs.append((s.english(), s.french()))
    return pairs


def build(config: DataConfig) -> tuple[dict[str, list[dict]], dict]:
    """Every data set of the world, as lists of JSON records, and the annotator's agreement
    with its own noiseless ordering on the preference pairs (measured and expected)."""
    world = make_world(config)
    eval_prompts = {e.prompt for e in world.eval_examples}
    sentence_pairs = _sentence_pairs(stream(config, "distractors"))

    # Instruction data.
    rng = stream(config, "sft")
    sft_prompts = TrainingPrompts(world, "sft")
    styles, style_weights = list(SFT_STYLES), list(SFT_STYLES.values())
    sft, used = [], set(eval_prompts)
    for _ in range(config.n_sft):
        example = sft_prompts.example(_draw_task(rng, config.task_weights), rng)
        style = rng.choices(styles, style_weights)[0]
        response = tasks.respond(example, style, rng, sentence_pairs)
        sft.append({"messages": [{"role": "user", "content": example.prompt},
                                 {"role": "assistant", "content": response}]})
        used.add(example.prompt)
    for _ in range(config.seed_probe_copies):
        sft.append({"messages": [{"role": "user", "content": SEED_PROMPT},
                                 {"role": "assistant", "content": SEED_REFERENCE}]})
    used.add(SEED_PROMPT)
    rng.shuffle(sft)

    # Preference data and PPO prompts, on prompts that SFT never saw.
    pref_prompts = TrainingPrompts(world, "preference")

    def fresh_example(rng: random.Random, avoid: set[str]) -> tasks.Example:
        while True:
            example = pref_prompts.example(_draw_task(rng, config.task_weights), rng)
            if example.prompt not in avoid:
                return example

    rng = stream(config, "preferences")
    preferences, score_pairs, agreed = [], [], 0
    for _ in range(config.n_preferences):
        example = fresh_example(rng, used)
        a_style, b_style = rng.sample(tasks.STYLES, 2)
        a = tasks.respond(example, a_style, rng, sentence_pairs)
        b = tasks.respond(example, b_style, rng, sentence_pairs)
        score_a, score_b = annotator.score_example(example, a), annotator.score_example(example, b)
        prefers_a = annotator.label_pair(score_a, score_b, rng)
        if score_a != score_b:
            score_pairs.append((score_a, score_b))
            agreed += prefers_a == (score_a > score_b)
        chosen, rejected = (a, b) if prefers_a else (b, a)
        preferences.append({"prompt": example.prompt, "chosen": chosen, "rejected": rejected})
    agreement = {"measured": agreed / max(len(score_pairs), 1),
                 "expected": annotator.expected_agreement(score_pairs), "pairs": len(score_pairs)}

    rng = stream(config, "heldout-preferences")
    avoid = used | {p["prompt"] for p in preferences}
    heldout_preferences = []
    while len(heldout_preferences) < config.n_heldout_preferences:
        example = fresh_example(rng, avoid)
        a_style, b_style = rng.sample(tasks.STYLES, 2)
        a = tasks.respond(example, a_style, rng, sentence_pairs)
        b = tasks.respond(example, b_style, rng, sentence_pairs)
        score_a, score_b = annotator.score_example(example, a), annotator.score_example(example, b)
        if score_a == score_b:
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        heldout_preferences.append({"prompt": example.prompt, "chosen": chosen, "rejected": rejected})

    rng = stream(config, "ppo")
    prompts = [{"prompt": fresh_example(rng, used).prompt} for _ in range(config.n_ppo_prompts)]

    # Pre-training text.
    pretrain = [{"text": t} for t in _corpus(world, "pretrain", config.pretrain_tokens)]
    heldout_text = [{"text": t} for t in _corpus(world, "heldout-text", config.heldout_text_tokens)]

    evaluation = [{"task": e.task, "prompt": e.prompt, "reference": e.reference} for e in world.eval_examples]
    for record in evaluation:
        if record["task"] == "json_record":
            record["schema"] = tasks.json_schema(list(json.loads(record["reference"])))

    return {
        "pretrain": pretrain,
        "heldout_text": heldout_text,
        "sft": sft,
        "preferences": preferences,
        "heldout_preferences": heldout_preferences,
        "prompts": prompts,
        "eval": evaluation,
    }, agreement


def _corpus(world: World, name: str, budget: int) -> list[str]:
    rng = stream(world.config, name)
    people = corpus.Cycle(world.people, rng)
    train_prompts = TrainingPrompts(world, "sft")
    reserved_pairs, reserved_words = world.reserved_pairs, world.reserved_words

    def instruction() -> str:
        return train_prompts.example(rng.choice(tasks.TASKS), rng).prompt

    def sentence() -> lexicon.Sentence:
        return train_prompts.sentence(rng)

    make = {
        "biography": lambda: corpus.biography(rng, people, world.config.paraphrase_rate),
        "phrase_book": lambda: corpus.phrase_book(rng, sentence, world.config.fixed_phrase_rate),
        "vocabulary": lambda: corpus.vocabulary(rng),
        "arithmetic_worksheet": lambda: corpus.arithmetic_worksheet(rng, lambda a, b: (a, b) not in reserved_pairs),
        "word_worksheet": lambda: corpus.word_worksheet(rng, lambda w: w not in reserved_words),
        "json_records": lambda: corpus.json_records(rng, people),
        "forum_thread": lambda: corpus.forum_thread(rng, instruction),
        "story": lambda: corpus.story(rng, people, sentence),
    }
    texts, total = [], 0
    for _, text in corpus.documents(rng, make, world.config.corpus_mix):
        texts.append(text)
        total += corpus.approx_tokens(text)
        if total >= budget:
            return texts
    return texts


FILES = ("pretrain", "heldout_text", "sft", "preferences", "heldout_preferences", "prompts", "eval")


def write(config: DataConfig, out: Path, log=print) -> dict[str, dict]:
    """Write every data set as `out/NAME.jsonl` and return per-file counts. Each file is written
    to a temporary name and renamed, so an interrupted run never leaves a truncated file."""
    start = time.time()
    data, agreement = build(config)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name in FILES:
        records = data[name]
        path = out / f"{name}.jsonl"
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        tokens = sum(corpus.approx_tokens(" ".join(_strings(r))) for r in records)
        stats[name] = {"records": len(records), "approx_tokens": tokens}
        log(f"  {path.name:<26} {len(records):>8,} records  ~{tokens:>10,} tokens")
    log(f"  annotator agreement with its noiseless ordering: {agreement['measured']:.3f} measured, "
        f"{agreement['expected']:.3f} expected, on {agreement['pairs']:,} preference pairs")
    log(f"  wrote {out} in {time.time() - start:.1f}s (seed {config.seed})")
    stats["annotator_agreement"] = agreement
    return stats


def _strings(record) -> list[str]:
    if isinstance(record, str):
        return [record]
    if isinstance(record, dict):
        return [s for v in record.values() for s in _strings(v)]
    if isinstance(record, list):
        return [s for v in record for s in _strings(v)]
    return []
