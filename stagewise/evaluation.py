"""Measurements of a model that stages share: held-out loss and fact cloze.

`heldout_loss` is the mean next-token loss (nats) on held-out pre-training text. `fact_cloze`
asks a base model to complete the sentences that state the world's facts ("Malin lives in")
and counts the completions that name the right value: it shows what pre-training put in the
weights, before any alignment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stagewise import engine
from stagewise.batching import ExampleBatches, eval_windows
from stagewise.model import Transformer
from stagewise.world.people import Person


@torch.no_grad()
def heldout_loss(model: Transformer, tokens: torch.Tensor, seq_len: int, batch_size: int = 16,
                 max_windows: int | None = None) -> float:
    """Mean next-token loss over consecutive windows of the held-out token stream."""
    windows = eval_windows(tokens, seq_len, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size].to(device)
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def masked_loss(model: Transformer, examples: list[tuple[list[int], list[bool]]], pad_id: int,
                batch_size: int = 64) -> float:
    """Mean loss per trained token (mask True) over examples, e.g. held-out conversations."""
    device = next(model.parameters()).device
    batches = ExampleBatches(examples, min(batch_size, len(examples)), seed=0, pad_id=pad_id)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for _ in range(len(batches)):  # whole batches; a partial last batch is left out
        x, y = batches.next()
        y = y.to(device)
        _, loss = model(x.to(device), y, supervised_only=True)
        n = int((y != -100).sum())
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


CLOZE = {"city": "{name} lives in ", "job": "{name} is a "}  # see Tokenizer.prompt_text


@torch.no_grad()
def fact_cloze(model: Transformer, tokenizer, people: list[Person], batch_size: int = 64) -> dict[str, float]:
    """Share of fact sentences completed with the right value (greedy), per attribute and overall.
    A completion is right when its first word, stripped of punctuation, is the value."""
    prompts, answers, kinds = [], [], []
    for person in people:
        for attribute, template in CLOZE.items():
            text = tokenizer.prompt_text(template.format(name=person.name))
            prompts.append([tokenizer.endoftext_id] + tokenizer.encode(text))
            answers.append(person.value(attribute))
            kinds.append(attribute)
    was_training = model.training
    model.eval()
    correct = []
    for i in range(0, len(prompts), batch_size):
        outs = engine.generate(model, prompts[i:i + batch_size], max_new_tokens=6)
        for out, answer in zip(outs, answers[i:i + batch_size]):
            words = tokenizer.decode(out).split()
            correct.append(bool(words) and words[0].strip(".,;:!?") == answer)
    model.train(was_training)
    result = {f"fact_cloze_{k}": _mean([c for c, kind in zip(correct, kinds) if kind == k]) for k in CLOZE}
    result["fact_cloze"] = _mean(correct)
    return result


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")
