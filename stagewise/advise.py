"""`stagewise advise`: which methods fit a situation, and why the others do not.

The answer is reasoned from the catalogue's fields (stagewise/methods.py), one rule each, so a
new method or a changed classification changes the advice without touching this file:

- weights:  with --no-weight-updates, a method whose `changes_weights` is not "no" is ruled
            out (reward_model too: it trains a separate model's weights);
- goal:     with --goal, a method that does not list the goal in `serves` is ruled out;
- data:     with --have, each of a method's `requires` groups must be met by a listed kind or
            by what an earlier recommended method `produces` (preferences -> reward_model ->
            ppo, best_of_n). Without --have nothing is assumed missing, and each recommendation
            says what it needs.

A ruled-out method gets every rule it fails. Recommendations come in the order they apply:
training methods in their typical order (pretrain, sft, reward_model, ppo or dpo), then the
inference-time ones in the order a request meets them (system prompt, demonstrations,
constrained decoding, best-of-n selection), which is the catalogue's order.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from stagewise import methods
from stagewise.errors import StagewiseError


@dataclass
class Advice:
    recommended: list[str] = field(default_factory=list)  # method ids, in the order they apply
    ruled_out: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # method id -> why (in or out)

    def as_dict(self) -> dict:
        return {"recommended": self.recommended, "ruled_out": self.ruled_out, "reasons": self.reasons}


def _weights(m: methods.Method) -> str:
    if m.changes_weights == "no":
        return "weights unchanged"
    if m.changes_weights == "yes":
        return "changes the weights"
    return f"changes the weights of the {m.changes_weights.replace(' only', '')} only"


def advise(*, no_weight_updates: bool = False, goal: str | None = None,
           have: Iterable[str] | None = None) -> Advice:
    """Recommended and ruled-out methods, each with its reason. `have`: the DATA_KINDS at hand,
    or None when unknown (then no method is ruled out for its data)."""
    if goal is not None and goal not in methods.GOALS:
        raise StagewiseError(f"advise: unknown goal {goal!r}; expected one of {', '.join(methods.GOALS)}")
    available = None if have is None else set(have)
    unknown = sorted((available or set()) - set(methods.DATA_KINDS))
    if unknown:
        raise StagewiseError(f"advise: unknown data kind {unknown[0]!r}; "
                             f"expected any of {', '.join(methods.DATA_KINDS)}")
    produced_by: dict[str, str] = {}  # kind -> the recommended method that makes it
    advice = Advice()
    for m in methods.CATALOGUE.values():
        serves = dict(m.serves)
        problems = []
        if no_weight_updates and m.changes_weights != "no":
            problems.append(f"{_weights(m)}, in {m.applied_at}, and no weight updates are allowed")
        if goal is not None and goal not in serves:
            problems.append(f"does not serve {goal} ({m.family} serves "
                            f"{', '.join(serves) or 'none of the alignment goals'})")
        sources = []
        if available is not None:
            for group in m.requires:
                met = [k for k in group if k in available]
                if met:
                    kind = met[0].replace("_", " ")
                    maker = produced_by.get(met[0])
                    sources.append(f"the {kind} from {maker}" if maker else f"your {kind}")
                    continue
                missing = f"needs {m.needs} ({' or '.join(group)}), which --have does not list"
                makers = [p.id for p in methods.CATALOGUE.values() if p.produces in group]
                if makers:
                    missing += f" (made by {', '.join(makers)}, which is not recommended here)"
                problems.append(missing)
        if problems:
            advice.ruled_out.append(m.id)
            advice.reasons[m.id] = "; ".join(problems)
            continue
        advice.recommended.append(m.id)
        how = serves[goal] if goal is not None else "; ".join(f"for {g}: {h}" for g, h in serves.items())
        how = how or f"{m.family}: the base model that alignment starts from"
        uses = f"uses {', '.join(sources)}" if sources else f"needs {m.needs}" if m.requires else ""
        when = "at inference" if m.at_inference else "in training"
        advice.reasons[m.id] = f"{how} ({', '.join(x for x in (when, _weights(m), uses) if x)})"
        if m.produces and available is not None:
            available.add(m.produces)
            produced_by[m.produces] = m.id
    return advice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-weight-updates", action="store_true",
                        help="only methods that leave the model's weights as they are")
    parser.add_argument("--goal", choices=methods.GOALS, default=None, help="what the model should get better at")
    parser.add_argument("--have", nargs="+", choices=methods.DATA_KINDS, default=None, metavar="DATA_KIND",
                        help=f"the data at hand, any of: {', '.join(methods.DATA_KINDS)} (default: not asked)")
    parser.add_argument("--json", action="store_true",
                        help="print {recommended, ruled_out, reasons} as one JSON object")


def command(args: argparse.Namespace) -> int:
    advice = advise(no_weight_updates=args.no_weight_updates, goal=args.goal, have=args.have)
    if args.json:
        print(json.dumps(advice.as_dict(), indent=2))
        return 0
    width = max(map(len, methods.CATALOGUE))
    print("Recommended, in the order they apply:" if advice.recommended else "Recommended: nothing fits.")
    for i, method_id in enumerate(advice.recommended, start=1):
        print(f"  {i}. {method_id:<{width}}  {advice.reasons[method_id]}")
    if advice.ruled_out:
        print("Ruled out:")
        for method_id in advice.ruled_out:
            print(f"     {method_id:<{width}}  {advice.reasons[method_id]}")
    return 0
