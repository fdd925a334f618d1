"""The method catalogue: every method stagewise ships, classified, in one registry.

Stages read it when they write lineage, `diagnose` and `advise` reason with it, and
`stagewise methods` prints it. A method is classified by its stage, its family, when it is
applied (training or inference), whether it changes weights, and what it needs.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Method:
    id: str
    stage: str
    family: str
    applied_at: str
    changes_weights: str  # "yes", "no", or "reward model only"
    needs: str

    @property
    def at_inference(self) -> bool:
        return self.applied_at == "inference"

    def as_dict(self) -> dict:
        return asdict(self)


CATALOGUE: dict[str, Method] = {m.id: m for m in [
    Method("pretrain", "pre-training", "next-token prediction", "training", "yes", "raw text"),
    Method("sft", "alignment", "instruction alignment", "training (fine-tuning)", "yes",
           "instruction/response pairs"),
    Method("reward_model", "alignment", "human-preference alignment", "training (a separate reward model)",
           "reward model only", "preference pairs"),
    Method("ppo", "alignment", "human-preference alignment", "training", "yes", "prompts + a reward model"),
    Method("dpo", "alignment", "human-preference alignment", "training", "yes", "preference pairs"),
    Method("system_prompt", "alignment", "prompting", "inference", "no", "an instruction"),
    Method("few_shot", "alignment", "prompting", "inference", "no", "demonstrations"),
    Method("constrained", "alignment", "inference-time control", "inference", "no",
           "JSON schema, regex, choice list or grammar"),
    Method("best_of_n", "alignment", "human-preference alignment at inference", "inference", "no",
           "a reward model"),
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
