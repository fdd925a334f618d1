"""`stagewise methods`: the method catalogue (SPEC section 1) as a table, or as JSON."""

from __future__ import annotations

import argparse
import json

from stagewise import methods

COLUMNS = ("method id", "stage", "family", "applied at", "changes weights", "needs")
CHANGES_WEIGHTS = {"yes": "yes", "no": "no", "reward model only": "yes, of the reward model only"}


def rows() -> list[tuple[str, ...]]:
    return [(m.id, m.stage, m.family, m.applied_at, CHANGES_WEIGHTS.get(m.changes_weights, m.changes_weights),
             m.needs) for m in methods.CATALOGUE.values()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="a JSON list, one object per method, with the fields advise reasons with")


def command(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([m.as_dict() for m in methods.CATALOGUE.values()], indent=2))
        return 0
    table = [COLUMNS] + rows()
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    for n, r in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    return 0
