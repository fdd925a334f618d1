"""`stagewise generate`: one prompt through a model directory, printed as the model answers it.

A base model gets the prompt as raw text to continue; a model that went through instruction or
preference alignment gets it as a user turn in its chat template. The choice comes from the
lineage, or from `--format` when given; a directory without lineage (written by another tool)
is taken for a base model.

Inference-time methods stack on any model: `--system` (system prompt), `--few-shot FILE`
(demonstrations, see stagewise/prompting.py for how each format shows them) and one constraint,
`--json-schema FILE`, `--regex RE` or `--choice A,B,...` (stagewise/constrained.py); `--layout
world` shows a base model the embedded world's own page for the prompt. `--best-of N --reward
DIR` samples N answers (at temperature 0.7 unless `--temperature` says otherwise) and prints the
one with the highest reward plus `--best-of-beta` times its log-probability under the model.
Each run hashes the weights (the reward model's too) before and after; `--json` prints the
answer with that check (`weights_unchanged`), the methods applied and whether a constrained
answer is complete.
Without `--json` only the answer is printed, and a run that changed the weights (a bug) is an
error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from stagewise import constrained, engine, methods, prompting
from stagewise.errors import StagewiseError
from stagewise.eval import BEST_OF_BETA, BEST_OF_TEMPERATURE, regularised_rewards, reward_scores
from stagewise.model import Transformer
from stagewise.model_dir import load_model_dir, load_reward_model
from stagewise.tokenizer import Tokenizer


@dataclass
class Answer:
    text: str
    tokens: list[int]  # as generated, the stop token included when there was one
    stopped: bool  # ended by a stop token, not by the token budget (constrained: complete)
    prompt: list[int]  # the prompt's ids as the model read them


def answers(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], *, chat: bool, max_new_tokens: int,
            system: str | None = None, demonstrations: Sequence[list[dict]] = (),
            constraint: constrained.Constraint | Sequence[constrained.Constraint | None] | None = None,
            layout: str = "plain", **sampling) -> list[Answer]:
    """Answer `prompts` in one batch, with an optional system prompt, demonstrations and
    constraint (one for all prompts, or one per prompt with None for free text). layout, for a
    base model: "plain", or "world" for the embedded world's pages (`prompting.world_page`).
    `sampling`: temperature, top_k, top_p, seed. max_new_tokens shrinks to fit the context."""
    rendered = []
    for p in prompts:
        page, question, demos = prompting.PLAIN, p, demonstrations
        if layout == "world" and not chat:
            page, question, demos = prompting.world_page(p, demonstrations)
        rendered.append(prompting.render(tokenizer, question, chat=chat, system=system, demonstrations=demos,
                                         layout=page))
    longest = max(len(r.ids) for r in rendered)
    max_len = model.cfg.max_seq_len
    if longest >= max_len:
        raise StagewiseError(f"the prompt takes {longest} tokens with its system prompt and {len(demonstrations)} "
                             f"demonstrations; the model's context is {max_len} tokens (use fewer demonstrations)")
    max_new_tokens = min(max_new_tokens, max_len - longest)
    ids, stops = [r.ids for r in rendered], rendered[0].stop_ids
    if constraint is None or isinstance(constraint, constrained.Constraint):
        constraint = [constraint] * len(prompts)
    if len(constraint) != len(prompts):
        raise StagewiseError(f"{len(constraint)} constraints for {len(prompts)} prompts")
    # A constrained answer ends where its grammar does; free ones (base few-shot) at the stop text.
    processors = []
    if any(c is not None for c in constraint):
        processors.append(constrained.ConstrainedDecoding(tokenizer, constraint, len(prompts),
                                                          vocab_size=model.cfg.vocab_size, stop_id=stops[0]))
    free = [i for i, c in enumerate(constraint) if c is None]
    stop_text = rendered[0].stop_text
    if stop_text and free:
        processors.append(prompting.StopAtText(tokenizer, stop_text, stops[0], only=free))
    outs = engine.generate(model, ids, max_new_tokens=max_new_tokens, stop_ids=stops,
                           logits_processor=_chain(processors), **sampling)
    return [Answer(prompting.response_text(tokenizer, o, r if c is None else replace(r, stop_text=None)), o,
                   bool(o) and o[-1] in r.stop_ids, r.ids)
            for o, r, c in zip(outs, rendered, constraint)]


def _chain(processors: list[engine.LogitsProcessor]) -> engine.LogitsProcessor | None:
    if len(processors) <= 1:
        return processors[0] if processors else None

    def chained(step, logits, rows, generated):
        for processor in processors:
            logits = processor(step, logits, rows, generated)
        return logits
    return chained


def complete(model: Transformer, tokenizer: Tokenizer, prompts: list[str], *, chat: bool, max_new_tokens: int,
             **kwargs) -> list[str]:
    """Responses as text, each without its stop token. kwargs: those of `answers`."""
    return [a.text for a in answers(model, tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens, **kwargs)]


def parse_choice(text: str) -> list[str]:
    """--choice "A,B,C": comma-separated options, surrounding spaces dropped."""
    options = [o.strip() for o in text.split(",")]
    if not all(options):
        raise StagewiseError(f"--choice {text!r}: every option must be non-empty (options are separated by commas)")
    return options


def constraint_from_args(args: argparse.Namespace) -> constrained.Constraint | None:
    if args.json_schema is not None:
        return constrained.load_json_schema(args.json_schema)
    if args.regex is not None:
        return constrained.regex(args.regex, where="--regex")
    if args.choice is not None:
        return constrained.choice(parse_choice(args.choice), where="--choice")
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory")
    parser.add_argument("--format", choices=("auto", "raw", "chat"), default="auto",
                        help="raw text or chat template; auto: chat when the lineage has sft, ppo or dpo")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system prompt (method system_prompt)")
    parser.add_argument("--few-shot", type=Path, default=None, metavar="FILE",
                        help='demonstrations, JSONL of {"prompt", "completion"} or {"messages"} (method few_shot)')
    parser.add_argument("--layout", choices=("plain", "world"), default="plain",
                        help="a base model's prompt page: plain entries, or the embedded world's own pages "
                             "(a phrase book for translation)")
    constraint = parser.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                            help="constrain the answer to this JSON schema (method constrained)")
    constraint.add_argument("--regex", default=None, metavar="RE", help="constrain the answer to match RE")
    constraint.add_argument("--choice", default=None, metavar="A,B,...", help="constrain the answer to one option")
    parser.add_argument("--best-of", type=int, default=0, metavar="N",
                        help="sample N answers and keep the one the reward model scores highest (method best_of_n)")
    parser.add_argument("--best-of-beta", type=float, default=BEST_OF_BETA, metavar="BETA",
                        help="the pick maximises reward + BETA * log-probability under the model "
                             "(0: the reward alone)")
    parser.add_argument("--reward", type=Path, default=None, metavar="DIR", help="reward model directory, for --best-of")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"0 is greedy (the default), {BEST_OF_TEMPERATURE} with --best-of")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: text, methods, weights_unchanged, complete, tokens")
    parser.add_argument("prompt", help="the prompt text")


def command(args: argparse.Namespace) -> int:
    # Everything the user gave is checked before the model is loaded, let alone run.
    if args.best_of < 0 or (args.best_of and args.reward is None) or (args.reward is not None and not args.best_of):
        raise StagewiseError("--best-of N and --reward DIR go together, with N at least 1")
    temperature = args.temperature if args.temperature is not None else (BEST_OF_TEMPERATURE if args.best_of else 0.0)
    constraint = constraint_from_args(args)
    demonstrations = prompting.load_demonstrations(args.few_shot) if args.few_shot is not None else []
    model, tokenizer, lineage = load_model_dir(args.model, require_lineage=False)
    model.eval()
    reward_model = None
    if args.best_of:
        reward_model, reward_tokenizer, _ = load_reward_model(args.reward)
        if reward_tokenizer.tk.to_str() != tokenizer.tk.to_str():
            raise StagewiseError(f"{args.reward}: the reward model's tokenizer is not {args.model}'s")
    chat = prompting.is_chat(lineage) if args.format == "auto" else args.format == "chat"
    applied = [m for m, used in (("system_prompt", args.system), ("few_shot", demonstrations),
                                 ("constrained", constraint), ("best_of_n", args.best_of)) if used]

    def run() -> Answer:
        candidates = answers(model, tokenizer, [args.prompt] * max(args.best_of, 1), chat=chat,
                             max_new_tokens=args.max_new_tokens, system=args.system, demonstrations=demonstrations,
                             constraint=constraint, layout=args.layout, temperature=temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed)
        if reward_model is None:
            return candidates[0]
        rewards = reward_scores(reward_model, tokenizer, [args.prompt] * len(candidates), [a.text for a in candidates])
        scores = regularised_rewards(model, rewards, [a.prompt for a in candidates], [a.tokens for a in candidates],
                                     args.best_of_beta)
        return candidates[scores.index(max(scores))]

    weights = [model] + ([reward_model] if reward_model is not None else [])
    answer, unchanged = methods.run_inference_method(weights, run)
    if args.json:
        print(json.dumps({"text": answer.text, "format": "chat" if chat else "raw", "methods": applied,
                          "weights_unchanged": unchanged, "complete": answer.stopped,
                          "tokens": len(answer.tokens)}, ensure_ascii=False))
    else:
        print(answer.text)
    if not unchanged:
        print("stagewise generate: error: the weights changed during inference", file=sys.stderr)
        return 1
    return 0
