"""Constrained decoding: a JSON schema, a regex, a choice list or a Lark grammar as a token mask.

An inference-time method (catalogue id `constrained`): it never touches the weights, it only
forbids, at every step, the tokens that could not continue a string of the constraint's
language. llguidance does the parsing: a `Constraint` is compiled (and refused with
llguidance's message if it does not compile) before any generation, then `ConstrainedDecoding`
holds one llguidance matcher per prompt and is the engine's `logits_processor`:

    c = constrained.json_schema(tasks.json_schema(["name", "city", "age"]))
    outs = constrained.generate(model, tokenizer, prompt_ids, c, stop_ids=[tokenizer.im_end_id],
                                max_new_tokens=64)

End of generation: the matcher's end-of-sequence token is the first of `stop_ids` (`<|im_end|>`
for a chat prompt, `<|endoftext|>` for raw text). It is allowed exactly when the text so far is
a complete string of the language, and once nothing more can follow it is the only token
allowed, so a row ends there. A row that runs out of `max_new_tokens` first is a truncated,
possibly invalid, output: `is_complete(out, stop_id)` tells them apart. Under greedy decoding
from an untrained model an unbounded string (a JSON string without maxLength) may never close;
bound it in the schema when that matters.

JSON schemas compile with the layout `json.dumps` writes and the world's records use
(`{"name": "Malin", "age": 34}`: ", " and ": " separators, no other whitespace), so a
constrained model is steered towards the text it was trained on. A schema may override this
through llguidance's `x-guidance` key.

Cost per step: each running row's matcher fills its row of a preallocated bitmask through
llguidance's pointer API (in Rust, GIL released), one table lookup of the bitmask's bytes turns
it into one boolean row per running prompt, and one `masked_fill_` applies it: no Python loop
over the vocabulary, and few operations per step (inside the decoding loop, where the model's
work has just left the caches cold, each costs several times what it costs on its own).
Rows are served one after another on the calling thread. With vocabularies of a few thousand
ids a mask takes microseconds, and llguidance's thread pool (`LLExecutor`) would only compete
with the model's matmul threads for the same cores (measured here: no faster at batch 16).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llguidance
import numpy as np
import torch

from stagewise import engine
from stagewise.errors import StagewiseError
from stagewise.model import Transformer
from stagewise.tokenizer import Tokenizer

# The world's record layout (json.dumps defaults), and no free whitespace a weak model could
# fill forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """A compiled constraint: its kind, what the user gave, and the llguidance grammar."""

    kind: str  # json_schema, regex, choice or lark
    source: str
    grammar: str


def _compiled(kind: str, source: str, grammar: str, where: str) -> Constraint:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise StagewiseError(f"{where}: does not compile: {messages[0].strip()}")
    return Constraint(kind, source, grammar)


def json_schema(schema: dict | bool | str, *, where: str = "JSON schema") -> Constraint:
    """A JSON schema (a dict, or its JSON text). `where` names it in error messages."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StagewiseError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(schema, (dict, bool)):
        raise StagewiseError(f"{where}: a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    source = json.dumps(schema, ensure_ascii=False)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise StagewiseError(f"{where}: does not compile: {e}") from None
    return _compiled("json_schema", source, grammar, where)


def load_json_schema(path: str | Path) -> Constraint:
    """A JSON schema read from a file; every error names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StagewiseError(f"{path}: cannot read the JSON schema file ({e})") from None
    return json_schema(text, where=f"{path}: JSON schema")


def regex(pattern: str, *, where: str = "regex") -> Constraint:
    """A regular expression (Rust `regex` syntax) the whole output must match."""
    return _compiled("regex", pattern, llguidance.LLMatcher.grammar_from_regex(pattern), f"{where} {pattern!r}")


def choice(options: Sequence[str], *, where: str = "choice list") -> Constraint:
    """Exactly one of `options`, verbatim."""
    options = list(options)
    if not options or not all(isinstance(o, str) and o for o in options):
        raise StagewiseError(f"{where}: needs at least one option, each a non-empty string; got {options!r}")
    # Lark string literals take JSON's escapes, so any option text can be quoted this way.
    lark_text = "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
    grammar = llguidance.LLMatcher.grammar_from_lark(lark_text)
    return _compiled("choice", json.dumps(options, ensure_ascii=False), grammar, where)


def lark(grammar: str, *, where: str = "Lark grammar") -> Constraint:
    """A Lark grammar in llguidance's dialect (rule `start`; regex terminals as /.../)."""
    return _compiled("lark", grammar, llguidance.LLMatcher.grammar_from_lark(grammar), where)


# ----------------------------------------------------------------------------- the llguidance tokenizer

# Building an llguidance tokenizer walks the whole vocabulary: once per (tokenizer, size, eos).
# Compiling a grammar for it takes a few hundred microseconds, copying a compiled matcher one:
# each tokenizer keeps the compiled matchers of the constraints it has served.
_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, dict]" = weakref.WeakKeyDictionary()
_MAX_COMPILED = 256


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_id: int) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer`, its vocabulary padded to `vocab_size` ids (the model's
    logits width; ids past the tokenizer's are never allowed) and `eos_id` as the token that
    ends a complete output."""
    return _served(tokenizer, vocab_size, eos_id)[0]


def _served(tokenizer: Tokenizer, vocab_size: int, eos_id: int) -> tuple[llguidance.LLTokenizer, dict]:
    if vocab_size < tokenizer.vocab_size:
        raise StagewiseError(f"constrained: the model's vocab_size {vocab_size} is smaller than the "
                             f"tokenizer's {tokenizer.vocab_size} ids")
    per_tokenizer = _LL_TOKENIZERS.setdefault(tokenizer, {})
    key = (vocab_size, eos_id)
    if key not in per_tokenizer:
        lltok = llguidance.LLTokenizer(tokenizer.tk.to_str(), n_vocab=vocab_size, eos_token=eos_id)
        per_tokenizer[key] = (lltok, {})
    return per_tokenizer[key]


def matcher(tokenizer: Tokenizer, constraint: Constraint, *, vocab_size: int, eos_id: int) -> llguidance.LLMatcher:
    """A fresh llguidance matcher for `constraint`, or a StagewiseError with llguidance's message."""
    lltok, compiled = _served(tokenizer, vocab_size, eos_id)
    if constraint not in compiled:
        m = llguidance.LLMatcher(lltok, constraint.grammar, log_level=0)
        if m.is_error():
            raise StagewiseError(f"constrained: {constraint.kind} {constraint.source[:80]!r} does not compile: "
                                 f"{m.get_error().strip()}")
        if len(compiled) >= _MAX_COMPILED:
            compiled.clear()
        compiled[constraint] = m
    return compiled[constraint].deep_copy()


# ----------------------------------------------------------------------------- the logits processor

# Byte value -> which of its 8 tokens are forbidden: bit t % 32 of little-endian word t // 32 is
# token t, so as bytes the bits are in little order. One lookup turns a bitmask into a mask.
_FORBIDDEN = torch.from_numpy(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 0)

class ConstrainedDecoding:
    """The engine's logits_processor for one `engine.generate` call: one matcher per prompt.

    constraints: one Constraint for every prompt, or a list with one per prompt where None
    leaves that prompt unconstrained (so one batch can mix, e.g., json_record prompts with
    free-text ones). Every matcher is built here, so a grammar the tokenizer cannot serve is
    refused before generation. Make a new one for each generate call: matchers keep state.
    """

    def __init__(self, tokenizer: Tokenizer, constraints: Constraint | Sequence[Constraint | None],
                 n_prompts: int, *, vocab_size: int, stop_id: int):
        if isinstance(constraints, Constraint):
            constraints = [constraints] * n_prompts
        constraints = list(constraints)
        if len(constraints) != n_prompts:
            raise StagewiseError(f"constrained: {len(constraints)} constraints for {n_prompts} prompts")
        self.vocab_size = vocab_size
        self.stop_id = stop_id
        self.matchers = [None if c is None else matcher(tokenizer, c, vocab_size=vocab_size, eos_id=stop_id)
                         for c in constraints]
        self.n_constrained = sum(m is not None for m in self.matchers)
        words = (vocab_size + 31) // 32
        self.bitmask = np.zeros((max(1, self.n_constrained), words), dtype=np.int32)  # (R, V/32)
        self._row_bytes = 4 * words
        self._address = self.bitmask.ctypes.data  # looked up once: `.ctypes` costs a microsecond a call
        self._bitmask_bytes = torch.from_numpy(self.bitmask.view(np.uint8))  # (R, V/8), the same memory

    def __call__(self, step: int, logits: torch.Tensor, rows: list[int], generated: list[list[int]]) -> torch.Tensor:
        pairs = [(j, self.matchers[r]) for j, r in enumerate(rows) if self.matchers[r] is not None]
        if not pairs:
            return logits
        if step > 0:
            # Each running row's previous token: it was sampled under the last mask, so it fits.
            for j, m in pairs:
                if not m.consume_token(generated[rows[j]][-1]):
                    raise StagewiseError(f"constrained: prompt {rows[j]}: token rejected by the grammar "
                                         f"({m.get_error().strip()})")
        n = len(pairs)
        for i, (_, m) in enumerate(pairs):
            m.unsafe_compute_mask_ptr(self._address + self._row_bytes * i, self._row_bytes)  # row i of the bitmask
        alive = self.bitmask[:n].any(axis=1)  # llguidance never sets bits past vocab_size
        if not alive.all():
            r = rows[pairs[int((~alive).nonzero()[0][0])][0]]
            raise StagewiseError(f"constrained: prompt {r}: the grammar allows no next token "
                                 f"({self.matchers[r].get_error().strip() or 'no continuation'})")
        # One lookup of the bitmask's bytes gives each token's bit: (n, V) True where forbidden.
        forbidden = _FORBIDDEN[self._bitmask_bytes[:n].long()].view(n, -1)[:, :self.vocab_size].to(logits.device)
        if n == len(rows):
            return logits.masked_fill_(forbidden, float("-inf"))
        index = torch.tensor([j for j, _ in pairs], device=logits.device)
        logits[index] = logits[index].masked_fill_(forbidden, float("-inf"))
        return logits


def is_complete(out: list[int], stop_id: int) -> bool:
    """Did a constrained row end as a complete string of its language (not cut by the budget)?"""
    return bool(out) and out[-1] == stop_id


def generate(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]],
             constraints: Constraint | Sequence[Constraint | None], *, stop_ids: Sequence[int],
             max_new_tokens: int, **sampling) -> list[list[int]]:
    """`engine.generate` under constraints. The first of `stop_ids` ends a complete output;
    the others still end unconstrained rows. `sampling`: temperature, top_k, top_p, seed."""
    if not stop_ids:
        raise StagewiseError("constrained: needs a stop token to end a complete output")
    cfg = getattr(model, "_orig_mod", model).cfg
    processor = ConstrainedDecoding(tokenizer, constraints, len(prompts), vocab_size=cfg.vocab_size,
                                    stop_id=stop_ids[0])
    return engine.generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                           logits_processor=processor, **sampling)
