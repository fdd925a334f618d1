"""Prompting: system prompts and few-shot demonstrations for chat and base models, stop text,
chat-or-base from the lineage, and the weights check of inference-time methods."""

import json

import pytest
import torch

from stagewise import engine, methods, prompting
from stagewise.errors import StagewiseError
from stagewise.model import ModelConfig, Transformer
from stagewise.tokenizer import train_tokenizer

TEXTS = ["Phrase book: English to French\n\nEnglish: I eat the red apple.\nFrench: Je mange la pomme rouge.",
         "Translate into French: Hello.\nBonjour.", "Malin lives in Brest.", "What is 2 + 3?\n2 + 3 = 5."] * 60

DEMOS = [{"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5."},
         {"messages": [{"role": "user", "content": "Translate into French: Hello."},
                       {"role": "assistant", "content": "Bonjour."}]}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 320)


@pytest.fixture
def demo_file(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    return path


def test_demonstrations_load_both_record_shapes(demo_file):
    demos = prompting.load_demonstrations(demo_file)
    assert demos == [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
                     [{"role": "user", "content": "Translate into French: Hello."},
                      {"role": "assistant", "content": "Bonjour."}]]


def test_bad_demonstration_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(DEMOS[0]) + "\n" + json.dumps({"prompt": "no completion"}) + "\n")
    with pytest.raises(StagewiseError, match=f"{path}, line 2"):
        prompting.load_demonstrations(path)


def test_chat_rendering_equals_render_chat_of_the_turns(tokenizer, demo_file):
    demos = prompting.load_demonstrations(demo_file)
    r = prompting.render(tokenizer, "What is 4 + 4?", chat=True, system="Answer briefly.", demonstrations=demos)
    turns = [{"role": "system", "content": "Answer briefly."}, *demos[0], *demos[1],
             {"role": "user", "content": "What is 4 + 4?"}]
    assert r.ids == tokenizer.render_chat(turns, add_generation_prompt=True)[0]
    assert r.chat and r.stop_ids == [tokenizer.im_end_id, tokenizer.endoftext_id] and r.stop_text is None
    plain = prompting.render(tokenizer, "Hi", chat=True)
    assert plain.ids == tokenizer.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)[0]


def test_base_rendering_is_the_page_layout(tokenizer, demo_file):
    demos = prompting.load_demonstrations(demo_file)
    text = prompting.base_text("What is 4 + 4?", system="Answers", demonstrations=demos)
    assert text == ("Answers\n\n"
                    "What is 2 + 3?\n2 + 3 = 5.\n\n"
                    "Translate into French: Hello.\nBonjour.\n\n"
                    "What is 4 + 4?\n")
    r = prompting.render(tokenizer, "What is 4 + 4?", chat=False, system="Answers", demonstrations=demos)
    assert r.ids == [tokenizer.endoftext_id] + tokenizer.encode(text)
    assert not r.chat and r.stop_ids == [tokenizer.endoftext_id] and r.stop_text == "\n\n"
    zero_shot = prompting.render(tokenizer, "Malin lives in", chat=False)
    assert zero_shot.ids == [tokenizer.endoftext_id] + tokenizer.encode("Malin lives in")
    assert zero_shot.stop_text is None


def test_world_page_is_a_phrase_book_for_translation(tokenizer):
    demos = [[{"role": "user", "content": "Translate into French: I eat the red apple."},
              {"role": "assistant", "content": "Je mange la pomme rouge."}],
             [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
             [{"role": "user", "content": "Translate into English: Bonjour."},
              {"role": "assistant", "content": "Hello."}]]
    layout, question, entries = prompting.world_page(
        "Translate the following sentence into French: Hello, how are you?", demos)
    assert layout == prompting.PHRASE_BOOKS["translate_en_fr"] and question == "Hello, how are you?"
    assert entries == [[{"role": "user", "content": "I eat the red apple."}, demos[0][1]]]  # same direction only
    r = prompting.render(tokenizer, question, chat=False, demonstrations=entries, layout=layout)
    # Exactly a page of world/corpus.py's phrase book, open at the answer (the label's space is
    # the label's last token with this tokenizer, see Tokenizer.prompt_text).
    assert tokenizer.decode(r.ids) == ("<|endoftext|>Phrase book: English to French\n\n"
                                       "English: I eat the red apple.\nFrench: Je mange la pomme rouge.\n\n"
                                       "English: Hello, how are you?\nFrench: ")
    assert r.stop_text == "\n\n"
    out = tokenizer.encode("Bonjour, comment allez-vous ?\n\nEnglish: I") + [tokenizer.endoftext_id]
    assert prompting.response_text(tokenizer, out, r) == "Bonjour, comment allez-vous ?"
    zero_shot = prompting.render(tokenizer, question, chat=False, layout=layout)  # a page even without demos
    assert tokenizer.decode(zero_shot.ids).endswith("French\n\nEnglish: Hello, how are you?\nFrench: ")
    assert prompting.world_page("What is 2 + 3?", demos) == (prompting.PLAIN, "What is 2 + 3?", demos)


def test_response_text_drops_stop_token_and_cuts_at_stop_text(tokenizer):
    base = prompting.render(tokenizer, "q", chat=False, demonstrations=[[{"role": "user", "content": "a"},
                                                                       {"role": "assistant", "content": "b"}]])
    out = tokenizer.encode("4 + 4 = 8.\n\nWhat is") + [tokenizer.endoftext_id]
    assert prompting.response_text(tokenizer, out, base) == "4 + 4 = 8."
    chat = prompting.render(tokenizer, "q", chat=True)
    assert prompting.response_text(tokenizer, tokenizer.encode("Bonjour.") + [tokenizer.im_end_id], chat) == "Bonjour."


def test_stop_at_text_ends_rows_at_a_blank_line(tokenizer):
    stop = tokenizer.endoftext_id
    processor = prompting.StopAtText(tokenizer, "\n\n", stop)
    generated = [tokenizer.encode("8.\n\n"), tokenizer.encode("8.\n"), []]
    logits = processor(3, torch.zeros(3, 10), [0, 1, 2], generated)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [stop]
    assert torch.isfinite(logits[1:]).all()
    # In the engine: a model made to emit newlines stops right after the first blank line.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                                    intermediate_size=32, max_seq_len=64)).eval()
    newline = tokenizer.encode("\n")[0]

    def newlines(step, logits, rows, generated):
        logits[:, newline] = 1e4
        return processor(step, logits, rows, generated)

    (out,) = engine.generate(model, [[stop]], max_new_tokens=20, stop_ids=[stop], logits_processor=newlines)
    assert out == [newline, newline, stop]


def test_chat_or_base_from_lineage_or_behaviour():
    assert prompting.is_chat([{"method": "pretrain"}, {"method": "sft"}])
    assert not prompting.is_chat([{"method": "pretrain"}])
    assert not prompting.is_chat(None) and not prompting.is_chat([])
    assert prompting.is_chat(None, behaviour=lambda: True)
    assert not prompting.is_chat([{"method": "pretrain"}], behaviour=lambda: True)  # the lineage wins


def test_weights_unchanged_check_catches_a_mutating_run():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                                    intermediate_size=32, max_seq_len=32)).eval()
    prompt = [[1, 2, 3]]

    def honest():
        return engine.generate(model, prompt, max_new_tokens=4)

    def mutating(step, logits, rows, generated):
        model.lm_head.weight.data[0, 0] += 1.0  # a bug an inference-time method must never have
        return logits

    out, unchanged = methods.run_inference_method(model, honest)
    assert unchanged and len(out[0]) == 4
    _, unchanged = methods.run_inference_method(
        model, lambda: engine.generate(model, prompt, max_new_tokens=4, logits_processor=mutating))
    assert not unchanged
