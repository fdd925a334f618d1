"""Tokenizer: special ids, digit splitting, round trips, ChatML rendering and its mask,
and parity with transformers' AutoTokenizer on a saved directory."""

import json
import random
import re

import pytest

from stagewise.errors import StagewiseError
from stagewise.tokenizer import CHAT_TEMPLATE, Tokenizer, train_tokenizer

STRINGS = [
    "Bonjour, comment allez-vous ?",
    "Le café de l'élève coûte 3,50 €.",
    "12345 + 678 = 13023",
    "<|im_start|>user\nQuelle heure est-il ?<|im_end|>\n",
    "  two leading spaces\n\n\ttab and trailing  ",
    "emoji 🙂 and 漢字",
    "<|endoftext|>next document",
]

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "Et en français ?"},
    {"role": "assistant", "content": "Quarante-deux, c'est ça."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    rng = random.Random(0)
    words = ("the cat sat on a mat what is answer briefly user assistant bonjour comment allez "
             "vous café élève quarante deux est ça").split()
    texts = [" ".join(rng.choice(words) for _ in range(8)) + f" {rng.randint(0, 99999)}" for _ in range(400)]
    return train_tokenizer(texts, 350)


def test_special_tokens_are_single_ids(tok):
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.encode("<|im_start|><|im_end|><|endoftext|><|pad|>") == [1, 2, 0, 3]
    assert tok.vocab_size <= 350


def test_digits_are_one_token_each(tok):
    ids = tok.encode("x 9081726354 y")
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == "x 9081726354 y"
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("9081726354")


@pytest.mark.parametrize("text", STRINGS)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_skip_special_tokens(tok):
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_render_chat_mask_is_exactly_assistant_content_and_im_end(tok):
    ids, mask = tok.render_chat(CHAT)
    # Naive reference, built turn by turn (exact here: no content starts with whitespace).
    expect_ids, expect_mask = [], []
    for m in CHAT:
        header = [tok.im_start_id] + tok.encode(m["role"] + "\n")
        body = tok.encode(m["content"]) + [tok.im_end_id]
        newline = tok.encode("\n")
        expect_ids += header + body + newline
        expect_mask += [False] * len(header) + [m["role"] == "assistant"] * len(body) + [False] * len(newline)
    assert ids == expect_ids
    assert mask == expect_mask
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "42.<|im_end|>Quarante-deux, c'est ça.<|im_end|>"


def test_generation_prompt(tok):
    ids, mask = tok.render_chat(CHAT[:2], add_generation_prompt=True)
    opening = [tok.im_start_id] + tok.encode("assistant\n")
    assert ids[-len(opening):] == opening
    assert not any(mask)


def test_content_with_leading_whitespace_is_masked_from_its_first_content_token(tok):
    ids, mask = tok.render_chat([{"role": "assistant", "content": "  indented"}])
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked.endswith("indented<|im_end|>") and "assistant" not in masked


def test_bad_message_raises(tok):
    with pytest.raises(StagewiseError, match="message 1"):
        tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant"}])


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path, model_max_length=128)
    again = Tokenizer.load(tmp_path)
    for text in STRINGS:
        assert again.encode(text) == tok.encode(text)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == CHAT_TEMPLATE == (tmp_path / "chat_template.jinja").read_text()
    assert (config["eos_token"], config["pad_token"], config["model_max_length"]) == ("<|endoftext|>", "<|pad|>", 128)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(StagewiseError, match=re.escape(str(tmp_path))):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(StagewiseError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_vocab_too_small_raises():
    with pytest.raises(StagewiseError, match="vocab_size"):
        train_tokenizer(["abc"], 100)


def test_matches_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in STRINGS:
        assert hf(text)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.endoftext_id, tok.pad_id)
    leading_space = [{"role": "user", "content": " x"}, {"role": "assistant", "content": "\n\n  y 12"}]
    for messages in (CHAT, CHAT[:2], leading_space):
        for gen in (False, True):
            theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            theirs = theirs if isinstance(theirs, list) else theirs["input_ids"]
            assert tok.render_chat(messages, add_generation_prompt=gen)[0] == theirs


def test_names_and_values_have_the_same_tokens_in_a_sentence_and_in_json(tok):
    def contains(text, word):
        ids, part = tok.encode(text), tok.encode(word)
        return any(ids[i:i + len(part)] == part for i in range(len(ids)))

    assert contains("Kerur lives in Rennes.", "Rennes") and contains('{"city": "Rennes"}', "Rennes")
    assert contains("Kerur is a writer.", "writer") and contains('{"job": "writer"}', "writer")
    # A name, too: the fact is learnt on the same tokens that a JSON record spells it with.
    assert contains("Kerur lives in Rennes.", "Kerur") and contains('{"name": "Kerur"}', "Kerur")


def test_a_prompt_ends_the_way_training_text_tokenizes(tok):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    assert tok.space_ends_word and tok.prompt_text("Kerur lives in ") == "Kerur lives in "
    gpt2_style = tokenizers.Tokenizer(models.BPE())
    gpt2_style.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2_style.decoder = tokenizers.decoders.ByteLevel()
    gpt2_style.train_from_iterator(STRINGS * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    other = Tokenizer(gpt2_style)
    assert not other.space_ends_word and other.prompt_text("Kerur lives in ") == "Kerur lives in"
