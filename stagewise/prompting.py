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
output line ("English: ...\nFrench: ..."). The generic layout (`PLAIN`) keeps that shape
without the labels, so it carries over to any task:

    <|endoftext|>{system}                  the system prompt, as a page's title paragraph

    {prompt 1}
    {completion 1}

    {prompt 2}
    {completion 2}

    {question}
    _                                       the model continues here

A `BaseLayout` adds a title and the entry labels; `world_page` picks, for the embedded world,
the page a base model trained on it knows best. This matters: a pre-trained default-preset
model given the seed prompt in the generic layout, after two translation demonstrations,
continues it as a forum thread (instructions only ever appear in forum posts in its corpus,
followed by chatter), while the same question as a phrase-book entry ("Phrase book: English to
French", then "English: Hello, how are you?\nFrench:") gets "Bonjour, comment allez-vous ?".
So for translation `world_page` writes the phrase book (the bare sentence as the entry); other
families keep the generic layout.

In either layout a model that has learned the pages answers on the output line and closes the
entry with a blank line, as the pages do. That blank line ("\n\n") is the stop text:
`StopAtText` ends a row there and `response_text` cuts the answer at it. A demonstration whose
completion itself holds a blank line would break the pattern; keep completions to one
paragraph. Without demonstrations or a page layout a base model gets the question as raw text
to continue, as before: that is what zero-shot means for a model that was never taught to
answer.
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


@dataclass(frozen=True)
class BaseLayout:
    """How a base model's page shows entries: an optional title paragraph, and labels in front
    of each entry's input line and output line. The default has none (the generic layout)."""

    title: str | None = None
    prompt_label: str = ""
    completion_label: str = ""

    @property
    def is_page(self) -> bool:
        return bool(self.title or self.prompt_label or self.completion_label)


PLAIN = BaseLayout()
# The embedded world's phrase-book pages, exactly as world/corpus.py writes them.
PHRASE_BOOKS = {
    "translate_en_fr": BaseLayout("Phrase book: English to French", "English: ", "French: "),
    "translate_fr_en": BaseLayout("Phrase book: French to English", "French: ", "English: "),
}


def _entry(demo: list[dict], layout: BaseLayout) -> str:
    labels = {"user": layout.prompt_label, "assistant": layout.completion_label}
    return "\n".join(labels.get(m["role"], "") + m["content"] for m in demo)


def base_text(prompt: str, *, system: str | None = None, demonstrations: Sequence[list[dict]] = (),
              layout: BaseLayout = PLAIN) -> str:
    """The text a base model continues (see the module docstring), without <|endoftext|>."""
    text = "".join(header + BLOCK_END for header in (system, layout.title) if header)
    for demo in demonstrations:
        text += _entry(demo, layout) + BLOCK_END
    if demonstrations or layout.is_page:
        # Ends on the output label, space included ("French: "); `render` fits that space to the
        # tokenizer (Tokenizer.prompt_text).
        return text + layout.prompt_label + prompt + "\n" + layout.completion_label
    return text + prompt


def world_page(prompt: str, demonstrations: Sequence[list[dict]] = ()) -> tuple[BaseLayout, str, list[list[dict]]]:
    """The page of the embedded world's pre-training text that a base model answers `prompt`
    best in: for a translation instruction, a phrase book (the bare sentence as the entry, and
    the demonstrations of the same direction as its earlier entries); for anything else, the
    plain layout with the prompt and demonstrations as they are. Returns (layout, question,
    demonstrations) for `render`."""
    from stagewise.world import tasks  # the world is one user of prompting, not a dependency of it

    def parsed(text: str) -> tuple[str, str] | None:
        found = tasks.parse_prompt(text)
        if found is None or found[0] not in PHRASE_BOOKS:
            return None
        return found[0], found[2]["text"]

    asked = parsed(prompt)
    if asked is None:
        return PLAIN, prompt, list(demonstrations)
    entries = []
    for demo in demonstrations:
        turns = [m for m in demo if m["role"] != "system"]
        shown = parsed(turns[0]["content"]) if len(turns) == 2 and turns[0]["role"] == "user" else None
        if shown is not None and shown[0] == asked[0]:  # other families would break the page
            entries.append([{"role": "user", "content": shown[1]}, turns[1]])
    return PHRASE_BOOKS[asked[0]], asked[1], entries


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
           demonstrations: Sequence[list[dict]] = (), layout: BaseLayout = PLAIN) -> Rendered:
    """Token ids of `prompt` with an optional system prompt and few-shot demonstrations.
    `layout` applies to base models only (see `world_page` for the embedded world's)."""
    if chat:
        ids, _ = tokenizer.render_chat(chat_messages(prompt, system=system, demonstrations=demonstrations),
                                       add_generation_prompt=True)
        return Rendered(ids, stop_ids(tokenizer, True), True)
    text = tokenizer.prompt_text(base_text(prompt, system=system, demonstrations=demonstrations, layout=layout))
    page = bool(demonstrations) or layout.is_page
    return Rendered([tokenizer.endoftext_id] + tokenizer.encode(text), stop_ids(tokenizer, False), False,
                    BLOCK_END if page else None)


def response_text(tokenizer: Tokenizer, out: list[int], rendered: Rendered) -> str:
    """The answer in generated tokens `out`: without its stop token; in a base model's page, the
    entry's output up to the blank line that closes it, without surrounding whitespace."""
    if out and out[-1] in rendered.stop_ids:
        out = out[:-1]
    text = tokenizer.decode(out)
    if rendered.stop_text is not None:
        text = text.split(rendered.stop_text, 1)[0].strip()
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
