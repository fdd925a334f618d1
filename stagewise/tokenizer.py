"""Tokenizer: byte-level BPE trained with the `tokenizers` library, plus the ChatML chat format.

Digits are split one per token before BPE, so numbers are spelled digit by digit and
arithmetic stays learnable; words carry their trailing space (`WORDS_PATTERN`). Special tokens are single ids:

    <|endoftext|>  ends a document in pretraining (also the tokenizer's bos/eos token)
    <|im_start|>   opens a chat turn: <|im_start|>{role}\\n{content}<|im_end|>\\n
    <|im_end|>     closes a chat turn; a chat model stops on it
    <|pad|>        padding only, never trained on (a separate id, so masking padding can
                   never mask a real end-of-text token)

Nothing is added around encoded text (no post-processor). Saved directories load in
transformers with `AutoTokenizer.from_pretrained` and give the same ids.
"""

import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from stagewise.errors import StagewiseError

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]  # ids 0..3 in a trained tokenizer

# How text is cut into words before BPE. A word keeps the space that follows it, not the one
# before it (GPT-2's convention), so a word has the same tokens after a space or a quote:
# "Kerur lives in Rennes." and {"city": "Rennes"} both spell the city with one token, and a fact
# learnt from sentences can be written out in a JSON field. A capitalised word (a name, a
# city) keeps no space at all, so it also has the same tokens before a space or a quote: the
# name that facts are learnt on in "Kerur lives in" is the name in {"name": "Kerur", "city":
# (spelt with other tokens there, a base model filled in a record's city one time in eight).
# Words in capitals ("I", "BOX") keep their space like lower-case ones. Digits stand alone.
WORDS_PATTERN = r"'(?:s|t|re|ve|m|ll|d) ?|\p{Lu}\p{Ll}+|\p{L}+ ?|\p{N}|[^\s\p{L}\p{N}]+ ?|\s+"

# The Jinja form of `Tokenizer.render_chat`, for transformers' apply_chat_template.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> "Tokenizer":
    """Train byte-level BPE on `texts` with at most `vocab_size` ids (special tokens and the
    256 byte tokens included); a small corpus may give fewer. See `Tokenizer.vocab_size`."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise StagewiseError(f"tokenizer: vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(WORDS_PATTERN), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no unknown token
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk)


class Tokenizer:
    def __init__(self, tk: tokenizers.Tokenizer, source: str = "tokenizer"):
        self.tk = tk
        ids = {}
        for token in SPECIAL_TOKENS:
            ids[token] = tk.token_to_id(token)
            if ids[token] is None:
                raise StagewiseError(f"{source}: special token {token} is missing from the vocabulary")
        self.endoftext_id = ids[ENDOFTEXT]
        self.im_start_id = ids[IM_START]
        self.im_end_id = ids[IM_END]
        self.pad_id = ids[PAD]
        self.special_ids = set(ids.values())
        # Does a space go with the word before it (this module's `WORDS_PATTERN`) rather than
        # with the word after it (GPT-2's convention, e.g. a tokenizer trained elsewhere)?
        self.space_ends_word = self.decode(self.encode("a b")[:1]) == "a "

    @property
    def vocab_size(self) -> int:
        """Number of ids in use; a model's vocab_size must be at least this."""
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token strings in the text become their single ids."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def prompt_text(self, text: str) -> str:
        """`text` ending the way training text tokenizes there: a prompt that stops before a word
        keeps its final space when spaces end words ("Kerur lives in ") and drops it when they
        start them ("Kerur lives in"), so the model never sees a split it was not trained on."""
        return text if self.space_ends_word else text.rstrip(" ")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """ChatML ids of `messages` and a mask that is True exactly on the tokens an assistant
        wrote: its content and its turn's <|im_end|> (the tokens SFT trains on).

        The whole conversation is encoded at once, as transformers' apply_chat_template does,
        so the ids match it; the mask comes from each token's character offsets. A token that
        starts in the turn header (e.g. a newline merged with content's leading spaces) is not
        masked.
        """
        text, spans = "", []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise StagewiseError(f"chat message {i}: expected a dict with string 'role' and 'content', got {m!r}")
            text += f"{IM_START}{m['role']}\n"
            start = len(text)
            text += m["content"] + IM_END
            if m["role"] == "assistant":
                spans.append((start, len(text)))
            text += "\n"
        if add_generation_prompt:
            text += f"{IM_START}assistant\n"
        enc = self.tk.encode(text, add_special_tokens=False)
        mask = [any(s <= a < e for s, e in spans) for a, _ in enc.offsets]
        return enc.ids, mask

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(d / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": ENDOFTEXT,
            "eos_token": ENDOFTEXT,
            "pad_token": PAD,
            "unk_token": None,
            "additional_special_tokens": [IM_START, IM_END],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise StagewiseError(f"{path}: missing tokenizer file")
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise StagewiseError(f"{path}: not a valid tokenizers file ({e})") from None
        return cls(tk, source=str(path))
