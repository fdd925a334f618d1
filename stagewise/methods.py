"""The method catalogue: every method stagewise ships, classified, in one registry.

Stages read it when they write lineage, `diagnose` and `advise` reason with it, and
`stagewise methods` prints it. A method is classified by its stage, its family, when it is
applied (training or inference), whether it changes weights, and what it needs.

For `advise` to reason rather than look answers up, each method also says, as data:
- `requires`: the kinds of data it needs (`DATA_KINDS`), as groups of which each must be met by
  any one of its kinds (few_shot takes demonstrations, or instruction pairs used as such);
- `produces`: the kind of thing it makes that another method may need (reward_model makes a
  reward model, which ppo and best_of_n need);
- `serves`: the goals (`GOALS`) it serves, each with how.

Inference-time methods never change weights; `run_inference_method` checks it on every run.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

from stagewise.model import weights_sha256

GOALS = ("structured-output", "instruction-following", "preference")
DATA_KINDS = ("raw_text", "instructions", "preferences", "demonstrations", "schema", "reward_model")


@dataclass(frozen=True)
class Method:
    id: str
    stage: str
    family: str
    applied_at: str
    changes_weights: str  # "yes", "no", or "reward model only"
    needs: str
    requires: tuple[tuple[str, ...], ...] = ()  # every group met by any one of its DATA_KINDS
    produces: str | None = None  # a DATA_KIND this method makes for later methods
    serves: tuple[tuple[str, str], ...] = ()  # (goal, how the method serves it)

    @property
    def at_inference(self) -> bool:
        return self.applied_at == "inference"

    def as_dict(self) -> dict:
        return asdict(self)


CATALOGUE: dict[str, Method] = {m.id: m for m in [
    Method("pretrain", "pre-training", "next-token prediction", "training", "yes", "raw text",
           requires=(("raw_text",),)),
    Method("sft", "alignment", "instruction alignment", "training (fine-tuning)", "yes",
           "instruction/response pairs", requires=(("instructions",),),
           serves=(("instruction-following", "trains the model to answer instructions rather than continue them"),
                   ("structured-output", "trains the answer format into the weights from pairs that use it"))),
    Method("reward_model", "alignment", "human-preference alignment", "training (a separate reward model)",
           "reward model only", "preference pairs", requires=(("preferences",),), produces="reward_model",
           serves=(("preference", "learns the annotators' preferences as a score that ppo and best_of_n "
                                  "then optimise"),)),
    Method("ppo", "alignment", "human-preference alignment", "training", "yes", "prompts + a reward model",
           requires=(("reward_model",),),
           serves=(("preference", "optimises the reward model's score, kept near the SFT model by a KL "
                                  "penalty"),)),
    Method("dpo", "alignment", "human-preference alignment", "training", "yes", "preference pairs",
           requires=(("preferences",),),
           serves=(("preference", "learns from the preference pairs directly, without a reward model "
                                  "(the alternative to reward_model + ppo)"),)),
    Method("system_prompt", "alignment", "prompting", "inference", "no", "an instruction",
           serves=(("instruction-following", "states the task and its rules before the question"),
                   ("structured-output", "asks for the format; followed only as well as the model follows "
                                         "instructions"),
                   ("preference", "asks for what annotators prefer, such as short answers"))),
    Method("few_shot", "alignment", "prompting", "inference", "no", "demonstrations",
           requires=(("demonstrations", "instructions"),),
           serves=(("instruction-following", "shows the task in context; even a base model continues the "
                                             "pattern"),
                   ("structured-output", "shows the format by example"))),
    Method("constrained", "alignment", "inference-time control", "inference", "no",
           "JSON schema, regex, choice list or grammar", requires=(("schema",),),
           serves=(("structured-output", "guarantees output that parses against the schema, whatever the "
                                         "model"),)),
    Method("best_of_n", "alignment", "human-preference alignment at inference", "inference", "no",
           "a reward model", requires=(("reward_model",),),
           serves=(("preference", "samples n answers and keeps the one the reward model scores highest"),)),
]}


def get(method_id: str) -> Method:
    return CATALOGUE[method_id]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def lineage_entry(method_id: str, *, parent: str | None, data_sha256: str | None, config: dict, metrics: dict,
                  weights_sha256: str, started: str, finished: str | None = None) -> dict:
    """One `lineage.json` entry (SPEC section 3), its classification taken from the catalogue."""
    m = get(method_id)
    return {
        "method": m.id,
        "stage": m.stage,
        "family": m.family,
        "applied_at": m.applied_at,
        "changes_weights": m.changes_weights != "no",
        "parent": parent,
        "data_sha256": data_sha256,
        "config": config,
        "metrics": metrics,
        "weights_sha256": weights_sha256,
        "started": started,
        "finished": finished or now(),
    }


T = TypeVar("T")


def run_inference_method(model, fn: Callable[[], T]) -> tuple[T, bool]:
    """Run `fn()` (an inference-time method applied to `model`, or to a list of models such as a
    policy and its reward model) and check that it left the weights as they were: returns (its
    result, weights_unchanged), the hash of the weights taken before and after (SPEC: checked,
    not just claimed)."""
    models = model if isinstance(model, (list, tuple)) else [model]
    before = [weights_sha256(m) for m in models]
    result = fn()
    return result, [weights_sha256(m) for m in models] == before
