"""Constrained decoding: outputs always in the constraint's language (even from an untrained
model), errors before generation, the mask padded to the logits width, and the end of output."""

import json
import re

import pytest
import torch

from stagewise import constrained, engine
from stagewise.errors import StagewiseError
from stagewise.model import ModelConfig, Transformer, weights_sha256
from stagewise.tokenizer import train_tokenizer
from stagewise.world import tasks

TEXTS = [f'{{"name": "{n}", "city": "{c}", "age": {a}}}' for n, c, a in
         [("Malin", "Brest", 34), ("Yves", "Lyon", 51), ("Ines", "Nice", 27)]] * 40 + \
        ["English: I eat the red apple.\nFrench: Je mange la pomme rouge.", "Malin lives in Brest.",
         "12 + 34 = 46.", "yes no maybe"] * 40


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 360)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    # A width that is not a multiple of 32 and exceeds the tokenizer: the mask must be padded.
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size + 45, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                      intermediate_size=32, max_seq_len=160)
    return Transformer(cfg).eval()


def prompts(tokenizer, n=4):
    texts = ["Give the record of Malin as JSON.", "x", "Malin lives in", '{"name": ']
    return [[tokenizer.endoftext_id] + tokenizer.encode(texts[i % len(texts)]) for i in range(n)]


BOUNDED_RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "city", "age"],
                  "properties": {"name": {"type": "string", "maxLength": 8},
                                 "city": {"type": "string", "enum": ["Brest", "Lyon", "Nice"]},
                                 "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


def validates(record, schema):
    props = schema["properties"]
    assert set(record) == set(schema["required"])
    assert isinstance(record["name"], str) and len(record["name"]) <= props["name"]["maxLength"]
    assert record["city"] in props["city"]["enum"]
    assert isinstance(record["age"], int) and 0 <= record["age"] <= 120


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_always_parse_and_validate(model, tokenizer, temperature):
    c = constrained.json_schema(BOUNDED_RECORD)
    stop = tokenizer.endoftext_id
    for seed in range(3):
        outs = constrained.generate(model, tokenizer, prompts(tokenizer), c, stop_ids=[stop], max_new_tokens=120,
                                    temperature=temperature, seed=seed)
        for out in outs:
            assert constrained.is_complete(out, stop)
            text = tokenizer.decode(out[:-1])
            validates(json.loads(text), BOUNDED_RECORD)
            assert text.startswith('{"name": "')  # json.dumps layout, as the world's records


def test_regex_and_choice_outputs(model, tokenizer):
    pattern = r"[a-z]{2,6}( [a-z]{1,4}){0,3}\."
    stop = tokenizer.im_end_id  # a chat model ends at <|im_end|>
    outs = constrained.generate(model, tokenizer, prompts(tokenizer, 8), constrained.regex(pattern),
                                stop_ids=[stop, tokenizer.endoftext_id], max_new_tokens=60, temperature=1.0, seed=0)
    for out in outs:
        assert out[-1] == stop and tokenizer.im_end_id not in out[:-1]
        assert re.fullmatch(pattern, tokenizer.decode(out[:-1]))
    options = ["Brest", "Lyon", 'say "oui"', "café au lait"]
    outs = constrained.generate(model, tokenizer, prompts(tokenizer, 8), constrained.choice(options),
                                stop_ids=[stop], max_new_tokens=40, temperature=1.0, seed=1)
    assert all(out[-1] == stop and tokenizer.decode(out[:-1]) in options for out in outs)


def test_lark_grammar(model, tokenizer):
    grammar = 'start: sum\nsum: NUM " + " NUM " = " NUM "."\nNUM: /[0-9]{1,2}/'
    outs = constrained.generate(model, tokenizer, prompts(tokenizer), constrained.lark(grammar),
                                stop_ids=[tokenizer.endoftext_id], max_new_tokens=40, temperature=1.0, seed=0)
    for out in outs:
        assert re.fullmatch(r"\d{1,2} \+ \d{1,2} = \d{1,2}\.", tokenizer.decode(out[:-1]))


def test_mixed_batch_leaves_unconstrained_rows_alone(model, tokenizer):
    ps = prompts(tokenizer)
    free = engine.generate(model, ps, max_new_tokens=20)
    mixed = constrained.generate(model, tokenizer, ps, [None, constrained.choice(["yes", "no"]), None, None],
                                 stop_ids=[tokenizer.endoftext_id], max_new_tokens=20)
    assert mixed[0] == free[0] and mixed[2:] == free[2:]
    assert tokenizer.decode(mixed[1][:-1]) in ("yes", "no")


@pytest.mark.parametrize("make, message", [
    (lambda: constrained.json_schema({"type": "objekt"}), "Invalid type: objekt"),
    (lambda: constrained.json_schema('{"type": "string", "pattern": "(("}'), "unclosed group"),
    (lambda: constrained.json_schema("{not json"), "not valid JSON"),
    (lambda: constrained.json_schema([1, 2]), "must be an object"),
    (lambda: constrained.regex("a(b"), "unclosed group"),
    (lambda: constrained.lark("start: foo"), 'unknown name: "foo"'),
    (lambda: constrained.choice([]), "at least one option"),
])
def test_bad_constraints_are_refused_with_llguidance_message(make, message):
    with pytest.raises(StagewiseError, match=re.escape(message)):
        make()


def test_bad_schema_is_refused_before_any_generation(model, tokenizer, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("generation started")
    monkeypatch.setattr(engine, "generate", forbidden)
    with pytest.raises(StagewiseError, match="does not compile"):
        c = constrained.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
        constrained.generate(model, tokenizer, prompts(tokenizer), c, stop_ids=[0], max_new_tokens=5)


def test_load_json_schema_names_the_file(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text('{"type": "strin"}')
    with pytest.raises(StagewiseError, match=re.escape(str(path))):
        constrained.load_json_schema(path)
    path.write_text(json.dumps(tasks.json_schema(["name", "age"])))
    assert constrained.load_json_schema(path).kind == "json_schema"


def test_mask_is_padded_to_the_logits_width(model, tokenizer):
    V = model.cfg.vocab_size
    assert V % 32 != 0 and V > tokenizer.vocab_size
    processor = constrained.ConstrainedDecoding(tokenizer, constrained.regex("[a-z ]+"), 2, vocab_size=V,
                                                stop_id=tokenizer.endoftext_id)
    logits = processor(0, torch.zeros(2, V), [0, 1], [[], []])
    allowed = torch.isfinite(logits)
    assert logits.shape == (2, V)
    assert not allowed[:, tokenizer.vocab_size:].any()  # ids the tokenizer does not have: never
    letters = [i for i in range(tokenizer.vocab_size) if re.fullmatch("[a-z ]+", tokenizer.decode([i]))]
    assert allowed[0].nonzero().flatten().tolist() == letters
    assert not allowed[:, tokenizer.endoftext_id].any()  # the empty string does not match "[a-z ]+"


def test_stop_token_allowed_exactly_when_complete(tokenizer):
    V = tokenizer.vocab_size + 45
    stop = tokenizer.im_end_id
    processor = constrained.ConstrainedDecoding(tokenizer, constrained.choice(["Brest", "Brest-Ouest"]), 1,
                                                vocab_size=V, stop_id=stop)
    generated = [[]]
    allowed = []
    for step, token in enumerate(tokenizer.encode("Brest")):
        allowed.append(torch.isfinite(processor(step, torch.zeros(1, V), [0], generated))[0])
        generated[0].append(token)
    after = torch.isfinite(processor(len(generated[0]), torch.zeros(1, V), [0], generated))[0]
    assert not any(a[stop] for a in allowed)  # before "Brest" is complete
    assert after[stop] and after.sum() > 1  # complete, but "-Ouest" may still follow
    assert not after[tokenizer.endoftext_id]  # the chat stop only, not the raw one
    processor = constrained.ConstrainedDecoding(tokenizer, constrained.choice(["Lyon"]), 1, vocab_size=V, stop_id=stop)
    generated = [[]]
    for step, token in enumerate(tokenizer.encode("Lyon")):
        processor(step, torch.zeros(1, V), [0], generated)
        generated[0].append(token)
    final = torch.isfinite(processor(len(generated[0]), torch.zeros(1, V), [0], generated))[0]
    assert final.nonzero().flatten().tolist() == [stop]  # nothing else can follow: it must end


def test_budget_exhaustion_is_reported_as_incomplete(model, tokenizer):
    c = constrained.json_schema(tasks.json_schema(["name"]))
    (out,) = constrained.generate(model, tokenizer, prompts(tokenizer, 1), c, stop_ids=[0], max_new_tokens=3)
    assert len(out) == 3 and not constrained.is_complete(out, 0)


def test_constrained_decoding_leaves_weights_unchanged(model, tokenizer):
    before = weights_sha256(model)
    constrained.generate(model, tokenizer, prompts(tokenizer), constrained.json_schema(BOUNDED_RECORD),
                         stop_ids=[0], max_new_tokens=30)
    assert weights_sha256(model) == before
