"""Small pieces every stage command shares: its arguments, config resolution, the output
directory's rules, data hashing and the embedded world's data. Not a base class: each stage
calls what it needs and owns its loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from stagewise import checkpoint, config
from stagewise.cli import add_config_arguments
from stagewise.errors import StagewiseError
from stagewise.world.build import DataConfig, build

TRAIN_STATE = "train_state"


def add_stage_arguments(parser: argparse.ArgumentParser, *, parent: bool) -> None:
    if parent:
        parser.add_argument("--from", dest="parent", required=True, type=Path, help="model directory to start from")
    parser.add_argument("--out", required=True, type=Path, help="model directory to write")
    parser.add_argument("--data", nargs="+", type=Path, default=None,
                        help="JSONL files in the TRL conventions; default: the embedded world")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --out (a finished stage is left as it is)")
    add_config_arguments(parser)


def resolve(cls, section: str, args: argparse.Namespace):
    """The stage's config: defaults, the preset's `data` section as `world`, the preset's
    own section, then overrides. Stage configs carry the world's config as field `world`."""
    preset = args.preset or "default"
    cfg = config.resolve(cls, section, preset, [])
    world = config.resolve(DataConfig, "data", preset, [])
    own = config.load_preset(preset).get(section) or {}
    if "world" not in own:
        cfg = dataclasses.replace(cfg, world=world)
    return config.resolve_overrides(cfg, args.overrides)


def prepare_out(out: Path, resume: bool) -> str:
    """What to do with --out: "fresh", "resume" or "finished". Refuses to write over an
    existing directory unless resuming, so nothing already written is damaged."""
    state = out / TRAIN_STATE
    if resume and state.is_dir():
        return "resume"
    if resume and (out / "lineage.json").is_file():
        return "finished"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if resume:
            raise StagewiseError(f"{out}: exists but holds neither a checkpoint nor a finished model to resume")
        raise StagewiseError(f"{out}: already exists and is not empty; pass --resume to continue it, "
                             "or choose another --out")
    # train_state/ marks the directory as a stage's working directory from the start, so the
    # model directory can be written into it at the end.
    (out / TRAIN_STATE).mkdir(parents=True, exist_ok=True)
    return "fresh"


def prepare_out_once(out: Path, resume: bool, dist) -> str:
    """`prepare_out` under torchrun: rank 0 alone looks at the output directory and every rank
    follows its decision, so that all of them resume, start fresh or stop together."""
    mode = prepare_out(out, resume) if dist is None or dist.is_main else None
    return dist.from_main(mode) if dist else mode


def finish_out(out: Path, keep_train_state: bool) -> None:
    if not keep_train_state:
        shutil.rmtree(out / TRAIN_STATE, ignore_errors=True)


def final_line(stage: str, final: dict) -> str:
    """The one line a stage prints about its final metrics."""
    return f"{stage}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items())


def data_sha256(records: list) -> str:
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


@lru_cache(maxsize=2)
def _world_data(world_json: str) -> tuple[dict, dict]:
    return build(DataConfig(**json.loads(world_json)))


def world_data(world: DataConfig) -> dict[str, list[dict]]:
    """The embedded world's data sets for this config (built once per process)."""
    return _world_data(json.dumps(dataclasses.asdict(world), sort_keys=True))[0]


def save_state(out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches,
               **extra) -> None:
    """A checkpoint of everything a resumed run needs to continue bit for bit."""
    from stagewise.training import rng_state
    checkpoint.save(out / TRAIN_STATE, step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "batches": batches.state_dict(), "rng": rng_state(), "step": step,
                                              **extra})


def restore_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, say) -> dict | None:
    """Load the newest valid checkpoint into model, optimizer and batches; None if there is none."""
    state = checkpoint.load_latest(out / TRAIN_STATE, warn=say)
    if state is not None:
        apply_state(state, model, optimizer, batches)
    return state


def apply_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    """Put a checkpoint's model, optimizer, data position and RNG state back."""
    from stagewise.training import set_rng_state
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["batches"])
    set_rng_state(state["rng"])


def chat_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids up to the assistant header, response ids with its <|im_end|>), split exactly
    where the chat template's rendering of the whole exchange puts the assistant's tokens."""
    ids, mask = tokenizer.render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    start = mask.index(True)
    end = len(mask) - mask[::-1].index(True)
    return ids[:start], ids[start:end]


def preference_triples(tokenizer, pairs: list[dict], max_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen response ids, rejected response ids) per preference pair, as the
    reward model and DPO read them: responses end with <|im_end|> and are cut so that each
    side fits max_len with its prompt."""
    out = []
    for pair in pairs:
        prompt, chosen = chat_pair(tokenizer, pair["prompt"], pair["chosen"])
        _, rejected = chat_pair(tokenizer, pair["prompt"], pair["rejected"])
        room = max_len - len(prompt)
        if room < 1:
            raise StagewiseError(f"a prompt of {len(prompt)} tokens leaves no room for a response in {max_len}")
        out.append((prompt, chosen[:room], rejected[:room]))
    return out
