"""`stagewise diagnose`: which stages a model's behaviour shows, what it should get next, and
whether its lineage agrees.

The probes are the seed prompt and a sample of held-out instructions of every family, asked
both as raw text and through the chat template, plus fact cloze on the world's people. From
behaviour alone:
- not pre-trained: it does not know the world (fact cloze below 0.5);
- pre-trained only: it knows the world but continues instruction text instead of answering
  (instruction following below 0.5 in either format);
- instruction-aligned: it answers instructions in the chat format and stops;
- preference-aligned: besides answering, its sampled answers keep to the form the annotator
  prefers (answer only, no rambling, the canonical form) far more often than demonstrations do.
A model directory without `lineage.json` is diagnosed from behaviour alone.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from stagewise import evaluation
from stagewise.eval import generate_answers, score_responses
from stagewise.model_dir import load_model_dir
from stagewise.stages import common
from stagewise.world import tasks
from stagewise.world.build import SEED_PROMPT, DataConfig, make_world

LABELS = ("not pre-trained", "pre-trained only", "instruction-aligned", "preference-aligned")
# Sampled answers in the ideal form at which behaviour counts as preference-aligned. In the
# default run the SFT model's samples were 0.86 ideal, its PPO and DPO models' 0.93 each.
PREFERENCE_IDEAL_FORM = 0.90
STAGES_SHOWN = {
    "not pre-trained": [],
    "pre-trained only": ["pre-training"],
    "instruction-aligned": ["pre-training", "instruction alignment"],
    "preference-aligned": ["pre-training", "instruction alignment", "human-preference alignment"],
}
NEXT = {
    "not pre-trained": ("pretrain", "it does not know the world's facts or languages yet: pre-training on raw text "
                                    "gives it that knowledge"),
    "pre-trained only": ("sft", "it knows the world but continues instruction text instead of answering: instruction "
                                "alignment (SFT on instruction/response pairs) teaches it to answer; without changing "
                                "weights, few-shot prompting in the pre-training format gets part of the way"),
    "instruction-aligned": ("dpo", "it answers, but the form of its answers varies as its demonstrations did: "
                                   "human-preference alignment (DPO on preference pairs, or a reward model then PPO) "
                                   "moves it to the answers people prefer"),
    "preference-aligned": ("constrained", "training-time alignment is done: for strict output formats add "
                                          "constrained decoding, and best-of-n with a reward model at inference"),
}
LINEAGE_LABEL = {"pretrain": "pre-trained only", "sft": "instruction-aligned", "dpo": "preference-aligned",
                 "ppo": "preference-aligned"}
PROBES_PER_TASK = 20
SAMPLES_PER_PROMPT = 2


def probe_records(world: DataConfig, per_task: int = PROBES_PER_TASK) -> list[dict]:
    records = common.world_data(world)["eval"]
    rng = random.Random(0)
    chosen = []
    for task in tasks.TASKS:
        pool = [r for r in records if r["task"] == task]
        chosen += rng.sample(pool, min(per_task, len(pool)))
    return chosen


def ideal_form_share(records: list[dict], responses: list[str]) -> float:
    """Among correct responses, the share given in exactly the ideal form (answer only,
    canonical shape): what preference alignment optimises beyond correctness."""
    ideal = [tasks.canonical_form(r["task"], r["reference"], text) for r, text in zip(records, responses)
             if tasks.check(r["task"], r["reference"], text)]
    return sum(ideal) / len(ideal) if ideal else 0.0


def lineage_label(lineage: list[dict] | None) -> str | None:
    if lineage is None:
        return None
    label = "not pre-trained"
    for entry in lineage:
        label = max(label, LINEAGE_LABEL.get(entry.get("method"), label), key=LABELS.index)
    return label


def diagnose(path: Path, world: DataConfig) -> dict:
    model, tokenizer, lineage = load_model_dir(path, require_lineage=False)
    model.eval()
    records = probe_records(world)
    people = make_world(world).people
    evidence: dict = {"fact_cloze": evaluation.fact_cloze(model, tokenizer, people[:100])["fact_cloze"]}
    answers = {}
    prompts = [r["prompt"] for r in records]
    for fmt in ("raw", "chat"):
        outputs = generate_answers(model, tokenizer, prompts + [SEED_PROMPT], chat=fmt == "chat", max_new_tokens=48)
        texts = [text for text, _, _, _ in outputs]
        scores = score_responses(records, texts[:-1])
        evidence[fmt] = {"instruction_following": scores["instruction_following"],
                         "continuation_rate": scores["continuation_rate"],
                         "stop_rate": sum(stopped for _, _, _, stopped in outputs[:-1]) / len(records)}
        answers[fmt] = texts[-1]
    follows = evidence["chat"]["instruction_following"] >= 0.5 and evidence["chat"]["stop_rate"] >= 0.8
    if follows:
        repeated = [r for r in records for _ in range(SAMPLES_PER_PROMPT)]
        sampled = generate_answers(model, tokenizer, [r["prompt"] for r in repeated], chat=True, max_new_tokens=48,
                                   temperature=1.0, seed=0)
        evidence["sampled_ideal_form"] = ideal_form_share(repeated, [text for text, _, _, _ in sampled])

    if evidence["fact_cloze"] < 0.5 and not follows:
        label = "not pre-trained"
    elif not follows:
        label = "pre-trained only"
    elif evidence["sampled_ideal_form"] >= PREFERENCE_IDEAL_FORM:
        label = "preference-aligned"
    else:
        label = "instruction-aligned"
    from_lineage = lineage_label(lineage)
    method, why = NEXT[label]
    return {
        "model": str(path),
        "behaviour": {"label": label, "stages": STAGES_SHOWN[label], "evidence": evidence},
        "lineage": None if lineage is None else {"label": from_lineage, "methods": [e.get("method") for e in lineage]},
        "agrees": None if lineage is None else from_lineage == label,
        "next": {"method": method, "why": why},
        "seed_example": {"prompt": SEED_PROMPT, "response": answers["chat" if follows else "raw"],
                         "format": "chat" if follows else "raw"},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, action="append", help="model directory (repeatable)")
    parser.add_argument("--preset", default="default", help="the preset whose world to probe with")
    parser.add_argument("--json", action="store_true")


def command(args: argparse.Namespace) -> int:
    from stagewise import config
    world = config.resolve(DataConfig, "data", args.preset, [])
    reports = [diagnose(path, world) for path in args.model]
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], ensure_ascii=False))
        return 0
    for report in reports:
        behaviour, lineage = report["behaviour"], report["lineage"]
        print(f"{report['model']}: behaves {behaviour['label']} (stages shown: "
              f"{', '.join(behaviour['stages']) or 'none'})")
        ev = behaviour["evidence"]
        print(f"  fact cloze {ev['fact_cloze']:.2f}; raw prompts: follows {ev['raw']['instruction_following']:.2f}, "
              f"continues {ev['raw']['continuation_rate']:.2f}; chat prompts: follows "
              f"{ev['chat']['instruction_following']:.2f}, stops {ev['chat']['stop_rate']:.2f}"
              + (f"; sampled answers in the ideal form {ev['sampled_ideal_form']:.2f}" if "sampled_ideal_form" in ev
                 else ""))
        if lineage is None:
            print("  lineage: none (behaviour only)")
        else:
            print(f"  lineage: {' -> '.join(lineage['methods'])} ({lineage['label']}); "
                  f"{'agrees' if report['agrees'] else 'DISAGREES'} with behaviour")
        print(f"  next: {report['next']['method']}, because {report['next']['why']}")
    if len(reports) > 1:
        print(f"\nSeed prompt: {SEED_PROMPT}")
        for i, report in enumerate(reports):
            seed = report["seed_example"]
            print(f"  Model {chr(65 + i)} ({report['behaviour']['label']}, {seed['format']} prompt): {seed['response']!r}")
    return 0
