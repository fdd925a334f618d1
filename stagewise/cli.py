"""The `stagewise` command line: one verb per command, each implemented in its own module.

A verb's module provides `add_arguments(parser)` and `command(args) -> int`. Bad input raised
as StagewiseError becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from stagewise.errors import StagewiseError

# verb -> (module, one-line help). Verbs appear here as they are built.
VERBS = {
    "data": ("stagewise.world.command", "write the embedded world as JSONL"),
    "pretrain": ("stagewise.stages.pretrain", "train a tokenizer and a model from nothing by next-token prediction"),
    "sft": ("stagewise.stages.sft", "instruction alignment: fine-tune on conversations, assistant tokens only"),
    "reward": ("stagewise.stages.reward", "train a reward model on preference pairs (Bradley-Terry)"),
    "ppo": ("stagewise.stages.ppo", "RLHF: optimise an SFT model against a reward model with PPO"),
    "dpo": ("stagewise.stages.dpo", "direct preference optimisation of an SFT model on preference pairs"),
    "run": ("stagewise.run", "the whole pipeline: every stage, evaluated, with a report"),
    "eval": ("stagewise.eval", "measure a model on held-out prompts (SPEC section 5 metrics)"),
    "diagnose": ("stagewise.diagnose", "tell from behaviour which stages a model went through, and what is next"),
    "generate": ("stagewise.generate", "answer one prompt with a model directory"),
    "methods": ("stagewise.catalogue_cli", "print the method catalogue: stage, when applied, weights, needs"),
    "advise": ("stagewise.advise", "recommend methods for a goal, the data at hand and whether weights may change"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset NAME and dotted key=value overrides, shared by every configurable verb."""
    parser.add_argument("--preset", default=None, help="preset name (smoke, default); default: default")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. optim.lr=1e-3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagewise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(command=module.command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.command(args) or 0
    except StagewiseError as e:
        print(f"stagewise {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stagewise {args.verb}: interrupted", file=sys.stderr)
        return 130
