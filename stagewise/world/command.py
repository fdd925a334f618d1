"""`stagewise data`: write the embedded world's data sets as JSONL."""

from __future__ import annotations

import argparse
from pathlib import Path

from stagewise import config
from stagewise.cli import add_config_arguments
from stagewise.world.build import DataConfig, write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="directory to write the JSONL files into")
    parser.add_argument("--seed", type=int, default=None, help="world seed (same seed, same bytes)")
    add_config_arguments(parser)


def command(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    cfg = config.resolve(DataConfig, "data", args.preset or "default", overrides)
    print(f"stagewise data: writing the embedded world to {args.out}")
    write(cfg, args.out)
    return 0
