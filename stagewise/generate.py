"""`stagewise generate`: one prompt through a model directory, printed as the model answers it.

A base model gets the prompt as raw text to continue; a model that went through instruction or
preference alignment gets it as a user turn in its chat template. The choice comes from the
lineage, or from `--format` when given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stagewise import engine
from stagewise.model_dir import load_model_dir

CHAT_METHODS = {"sft", "ppo", "dpo"}


def is_chat_model(lineage: list[dict]) -> bool:
    return any(entry.get("method") in CHAT_METHODS for entry in lineage)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        return tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
    return [tokenizer.endoftext_id] + tokenizer.encode(prompt)


def stop_ids(tokenizer, chat: bool) -> list[int]:
    return [tokenizer.im_end_id, tokenizer.endoftext_id] if chat else [tokenizer.endoftext_id]


def complete(model, tokenizer, prompts: list[str], *, chat: bool, max_new_tokens: int, **sampling) -> list[str]:
    """Responses as text, each without its stop token."""
    ids = [prompt_ids(tokenizer, p, chat) for p in prompts]
    limit = max(len(i) for i in ids) + max_new_tokens
    if limit > model.cfg.max_seq_len:
        max_new_tokens = max(1, model.cfg.max_seq_len - max(len(i) for i in ids))
    outs = engine.generate(model, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids(tokenizer, chat), **sampling)
    stops = set(stop_ids(tokenizer, chat))
    return [tokenizer.decode(o[:-1] if o and o[-1] in stops else o) for o in outs]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory")
    parser.add_argument("--format", choices=("auto", "raw", "chat"), default="auto",
                        help="raw text or chat template; auto: chat when the lineage has sft, ppo or dpo")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("prompt", help="the prompt text")


def command(args: argparse.Namespace) -> int:
    model, tokenizer, lineage = load_model_dir(args.model)
    model.eval()
    chat = is_chat_model(lineage) if args.format == "auto" else args.format == "chat"
    (text,) = complete(model, tokenizer, [args.prompt], chat=chat, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text)
    return 0
