"""Prompting: a system prompt and few-shot demonstrations, rendered for a chat or a base model.

Both are inference-time methods (catalogue ids `system_prompt` and `few_shot`): the weights stay
as they are, only the tokens in front of the question change. The result of `render` is what
the engine needs: the prompt's token ids, the stop ids, and, for a base model shown
demonstrations, the text that ends an answer.

A chat model (one whose lineage went through sft, ppo or dpo) gets ChatML: the system prompt as
a system turn, each demonstration as earlier user/assistant turns, the question as the last
user turn, then the assistant header. It stops at `<|im_end|>`.

A base model gets plain text that it can continue, laid out as its pre-training pages are.
The embedded world's phrase books and vocabulary lists (see world/corpus.py) are a title, a
blank line, then entries separated by blank lines, each entry an input line followed by its
output line ("English: ...\\nFrench: ..."). So:

    <|endoftext|>{system}                  the system prompt, as a page's title paragraph

    {prompt 1}
    {completion 1}

    {prompt 2}
    {completion 2}

    {question}
    _                                       the model continues here

The demonstrations show the pattern "input line, answer line, blank line" in the same shape,
without labels the corpus never uses, so it carries over to any task; a model that has learned
the page layout answers on the line after the question and then closes the entry with a blank
line, as the pages do. That blank line ("\\n\\n") is the stop text: `StopAtText` ends a row
there and `response_text` cuts the answer at it. A demonstration whose completion itself holds a
blank line would break the pattern; keep completions to one paragraph. Without demonstrations a
base model gets the question as raw text to continue, as before: that is what zero-shot means
for a model that was never taught to answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stagewise import data
from stagewise.tokenizer import Tokenizer

CHAT_METHODS = {"sft", "ppo", "dpo"}
BLOCK_END = "\n\n"  # ends a demonstration, and so an answer, in the base layout


def is_chat_model(lineage: list[dict]) -> bool:
    """Did the weights go through instruction or preference alignment?"""
    return any(entry.get("method") in CHAT_METHODS for entry in lineage)


def is_chat(lineage: list[dict] | None, behaviour: Callable[[], bool] | None = None) -> bool:
    """Chat format or raw text for a model: from its lineage when it has one; a model without
    lineage (e.g. imported from elsewhere) is asked `behaviour()`, a probe of how it responds,
    when given, and is otherwise treated as a base model."""
    if lineage:
        return is_chat_model(lineage)
    return behaviour() if behaviour is not None else False


def load_demonstrations(path: str | Path) -> list[list[dict]]:
    """Few-shot demonstrations from a JSONL file of `{"prompt", "completion"}` or `{"messages"}`
    records (validated as chat data: errors name the file and line); each is a list of turns."""
    return [record["messages"] for record in data.load(Path(path), "chat")]


def chat_messages(prompt: str, *, system: str | None = None,
                  demonstrations: Sequence[list[dict]] = ()) -> list[dict]:
    """The conversation a chat model sees: system turn, demonstrations' turns, the question."""
    messages = [{"role": "system", "content": system}] if system else []
    for demo in demonstrations:
        messages += [{"role": m["role"], "content": m["content"]} for m in demo]
    return messages + [{"role": "user", "content": prompt}]


def base_text(prompt: str, *, system: str | None = None, demonstrations: Sequence[list[dict]] = ()) -> str:
    """The text a base model continues (see the module docstring), without <|endoftext|>."""
    text = system + BLOCK_END if system else ""
    for demo in demonstrations:
        text += "\n".join(m["content"] for m in demo) + BLOCK_END
    if demonstrations:
        return text + prompt + "\n"
    return text + prompt


@dataclass(frozen=True)
class Rendered:
    """A prompt ready for the engine."""

    ids: list[int]
    stop_ids: list[int]  # the first one ends an answer; constrained decoding uses it as end of output
    chat: bool
    stop_text: str | None = None  # an answer also ends where this text appears (base few-shot)


def stop_ids(tokenizer: Tokenizer, chat: bool) -> list[int]:
    return [tokenizer.im_end_id, tokenizer.endoftext_id] if chat else [tokenizer.endoftext_id]


def render(tokenizer: Tokenizer, prompt: str, *, chat: bool, system: str | None = None,
           demonstrations: Sequence[list[dict]] = ()) -> Rendered:
    """Token ids of `prompt` with an optional system prompt and few-shot demonstrations."""
    if chat:
        ids, _ = tokenizer.render_chat(chat_messages(prompt, system=system, demonstrations=demonstrations),
                                       add_generation_prompt=True)
        return Rendered(ids, stop_ids(tokenizer, True), True)
    ids = [tokenizer.endoftext_id] + tokenizer.encode(base_text(prompt, system=system, demonstrations=demonstrations))
    return Rendered(ids, stop_ids(tokenizer, False), False, BLOCK_END if demonstrations else None)


def response_text(tokenizer: Tokenizer, out: list[int], rendered: Rendered) -> str:
    """The answer in generated tokens `out`: without its stop token, cut at the stop text."""
    if out and out[-1] in rendered.stop_ids:
        out = out[:-1]
    text = tokenizer.decode(out)
    if rendered.stop_text is not None:
        text = text.split(rendered.stop_text, 1)[0]
    return text


class StopAtText:
    """A logits_processor (see engine.generate) that ends a row with `stop_id` as soon as its
    generated text contains `text`: the engine stops rows on token ids only, and a blank line
    is not one token (BPE splits newlines differently depending on what follows them)."""

    def __init__(self, tokenizer: Tokenizer, text: str, stop_id: int, only: Iterable[int] | None = None):
        self.tokenizer, self.text, self.stop_id = tokenizer, text, stop_id
        self.window = len(text.encode("utf-8"))  # every token is at least one byte
        self.only = None if only is None else set(only)  # the prompts it applies to; default all

    def __call__(self, step: int, logits: torch.Tensor, rows: list[int], generated: list[list[int]]) -> torch.Tensor:
        if step == 0:
            return logits
        for j, r in enumerate(rows):
            if self.only is not None and r not in self.only:
                continue
            # Checked every step, so a new occurrence ends within the last `window` tokens.
            if self.text in self.tokenizer.decode(generated[r][-self.window:]):
                logits[j] = float("-inf")
                logits[j, self.stop_id] = 0.0
        return logits
