"""`stagewise eval`: the metrics of one model on held-out prompts (SPEC section 5).

A base model gets each instruction as raw text to continue; a model that went through
instruction or preference alignment gets it as a user turn in its chat template. Which one is
decided by the lineage (or `--format`) and stated in the output as `prompt_format`. Responses
are greedy. Each is judged by its family's checker (`instruction_following`, `per_task`), by
whether it answered at all or continued the text (`continuation_rate`), by the simulated
annotator (`gold_reward`) and, for json_record, by whether the whole response is a valid
record (`format_valid`). `heldout_loss` is measured on held-out pre-training text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch

from stagewise import data, engine, evaluation
from stagewise.errors import StagewiseError
from stagewise.model import Transformer
from stagewise.model_dir import load_model_dir
from stagewise.stages import common
from stagewise.world import annotator, tasks
from stagewise.world.build import SEED_PROMPT, DataConfig, make_world

CHAT_METHODS = {"sft", "ppo", "dpo"}
MAX_NEW_TOKENS = 64


def is_chat_model(lineage: list[dict]) -> bool:
    return any(entry.get("method") in CHAT_METHODS for entry in lineage)


def render(tokenizer, prompt: str, chat: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, stop ids): a user turn for chat models, raw text after <|endoftext|> otherwise."""
    if chat:
        ids = tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
        return ids, [tokenizer.im_end_id, tokenizer.endoftext_id]
    return [tokenizer.endoftext_id] + tokenizer.encode(prompt), [tokenizer.endoftext_id]


def respond(model: Transformer, tokenizer, prompts: list[list[int]], stop_ids: list[int], *,
            max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 64, **sampling) -> list[tuple[list[int], bool]]:
    """(response ids without the stop token, whether it stopped) per prompt, batched by length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    stops = set(stop_ids)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        room = model.cfg.max_seq_len - max(len(prompts[i]) for i in chunk)
        results = engine.generate(model, [prompts[i] for i in chunk], max_new_tokens=min(max_new_tokens, room),
                                  stop_ids=stop_ids, **sampling)
        for i, ids in zip(chunk, results):
            stopped = bool(ids) and ids[-1] in stops
            out[i] = (ids[:-1] if stopped else ids, stopped)
    return out


def score_responses(records: list[dict], responses: list[str], judge: Callable[[str, str], float] | None) -> dict:
    """The instruction metrics for responses to eval records ({"task", "prompt", "reference"})."""
    per_task: dict[str, list[bool]] = {}
    continued, gold, valid = [], [], []
    for record, response in zip(records, responses):
        task, reference = record["task"], record["reference"]
        if task not in tasks.TASKS:
            raise StagewiseError(f"eval record for task {task!r}: no checker; tasks are {', '.join(tasks.TASKS)}")
        per_task.setdefault(task, []).append(tasks.check(task, reference, response))
        continued.append(not tasks.attempts_answer(task, reference, response))
        if judge is not None:
            gold.append(judge(record["prompt"], response))
        if task == "json_record":
            valid.append(tasks.format_valid(reference, response))
    correct = [c for values in per_task.values() for c in values]
    metrics = {
        "instruction_following": _mean(correct),
        "continuation_rate": _mean(continued),
        "per_task": {t: _mean(v) for t, v in sorted(per_task.items())},
        "format_valid": _mean(valid) if valid else None,
        "gold_reward": _mean(gold) if gold else None,
        "n_prompts": len(records),
    }
    return metrics


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def evaluate_model(model: Transformer, tokenizer, lineage: list[dict], *, world: DataConfig,
                   eval_records: list[dict] | None = None, chat: bool | None = None,
                   heldout_texts: list[str] | None = None) -> dict:
    """Every single-model metric that applies, plus the responses to the seed prompt."""
    chat = is_chat_model(lineage) if chat is None else chat
    world_data = common.world_data(world)
    records = eval_records if eval_records is not None else world_data["eval"]
    texts = heldout_texts if heldout_texts is not None else [r["text"] for r in world_data["heldout_text"]]
    people = make_world(world).people_by_name if eval_records is None else None

    prompts, stop_ids = [], []
    for record in records + [{"prompt": SEED_PROMPT}]:
        ids, stop_ids = render(tokenizer, record["prompt"], chat)
        prompts.append(ids)
    outputs = respond(model, tokenizer, prompts, stop_ids)
    texts_out = [tokenizer.decode(ids) for ids, _ in outputs]
    judge = (lambda p, r: annotator.gold_score(p, r, people)) if people is not None else None
    metrics = score_responses(records, texts_out[:-1], judge)
    metrics["stop_rate"] = _mean([stopped for _, stopped in outputs[:-1]])
    tokens = torch.cat([torch.tensor([tokenizer.endoftext_id] + ids) for ids in tokenizer.encode_batch(texts)])
    metrics["heldout_loss"] = evaluation.heldout_loss(model, tokens, model.cfg.max_seq_len)
    metrics["prompt_format"] = "chat" if chat else "raw"
    metrics["seed_example"] = {"prompt": SEED_PROMPT, "response": texts_out[-1]}
    metrics["examples"] = [{"task": r["task"], "prompt": r["prompt"], "response": t}
                           for r, t in list(zip(records, texts_out))[:: max(1, len(records) // 12)]]
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory")
    parser.add_argument("--data", type=Path, default=None,
                        help='eval JSONL ({"task", "prompt", "reference"}); default: the embedded world')
    parser.add_argument("--format", choices=("auto", "raw", "chat"), default="auto",
                        help="prompt format; auto: chat when the lineage has sft, ppo or dpo")
    parser.add_argument("--preset", default="default", help="the preset whose world to evaluate on")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def command(args: argparse.Namespace) -> int:
    from stagewise import config
    world = config.resolve(DataConfig, "data", args.preset, [])
    records = data.load(args.data, "eval") if args.data else None
    model, tokenizer, lineage = load_model_dir(args.model)
    chat = None if args.format == "auto" else args.format == "chat"
    metrics = evaluate_model(model, tokenizer, lineage, world=world, eval_records=records, chat=chat)
    if args.json:
        print(json.dumps(metrics, ensure_ascii=False))
        return 0
    print(f"{args.model} ({metrics['prompt_format']} prompts, {metrics['n_prompts']} held-out instructions)")
    for key in ("heldout_loss", "instruction_following", "continuation_rate", "gold_reward", "format_valid",
                "stop_rate"):
        if metrics.get(key) is not None:
            print(f"  {key:<22} {metrics[key]:.3f}")
    for task, value in metrics["per_task"].items():
        print(f"    {task:<20} {value:.3f}")
    print(f"  seed prompt: {SEED_PROMPT!r}\n  response:    {metrics['seed_example']['response']!r}")
    return 0
