"""`stagewise generate` with inference-time methods: system prompt, few-shot, constraints, the
weights check in --json, and clean errors for bad input."""

import json
import re

import pytest
import torch

from stagewise import cli, generate
from stagewise.model import ModelConfig, Transformer
from stagewise.model_dir import save_model_dir
from stagewise.tokenizer import train_tokenizer

TEXTS = ['{"name": "Malin", "city": "Brest", "age": 34}', "English: I eat.\nFrench: Je mange.",
         "What is 2 + 3?\n2 + 3 = 5.", "yes no"] * 60
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    tokenizer = train_tokenizer(TEXTS, 320)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size + 7, n_layer=1, n_head=2, n_kv_head=2,
                                    n_embd=16, intermediate_size=32, max_seq_len=128))
    base = save_model_dir(root / "base", model, tokenizer, [{"method": "pretrain"}])
    chat = save_model_dir(root / "chat", model, tokenizer, [{"method": "pretrain"}, {"method": "sft"}])
    return base, chat


def run(capsys, *args):
    try:
        code = cli.main(["generate", *map(str, args)])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_reports_methods_and_weights_check(model_dirs, capsys, tmp_path):
    base, chat = model_dirs
    code, out, err = run(capsys, "--model", chat, "--json", "--max-new-tokens", "5", "Hello")
    assert code == 0, err
    result = json.loads(out)
    assert result["weights_unchanged"] is True and result["methods"] == [] and result["format"] == "chat"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    code, out, err = run(capsys, "--model", chat, "--json", "--system", "Answer in JSON.", "--json-schema", schema,
                         "--max-new-tokens", "60", "--temperature", "1", "--seed", "3", "Give the record of Malin.")
    assert code == 0, err
    result = json.loads(out)
    assert result["methods"] == ["system_prompt", "constrained"] and result["weights_unchanged"] is True
    assert result["complete"] is True
    record = json.loads(result["text"])
    assert set(record) == {"name", "age"} and len(record["name"]) <= 6 and 0 <= record["age"] <= 99


def test_regex_and_choice(model_dirs, capsys):
    base, chat = model_dirs
    for model in (base, chat):
        code, out, err = run(capsys, "--model", model, "--regex", "[a-z]{1,5}!", "--temperature", "1", "--seed", "0",
                             "Say something")
        assert code == 0, err
        assert re.fullmatch("[a-z]{1,5}!", out.rstrip("\n"))
        code, out, err = run(capsys, "--model", model, "--choice", "yes, no ,maybe", "Is it?")
        assert code == 0, err
        assert out.rstrip("\n") in ("yes", "no", "maybe")


def test_few_shot_on_a_base_model(model_dirs, capsys, tmp_path):
    base, _ = model_dirs
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5."}) + "\n")
    code, out, err = run(capsys, "--model", base, "--few-shot", demos, "--json", "--max-new-tokens", "8",
                         "What is 4 + 4?")
    assert code == 0, err
    result = json.loads(out)
    assert result["format"] == "raw" and result["methods"] == ["few_shot"] and "\n\n" not in result["text"]
    code, out, err = run(capsys, "--model", base, "--layout", "world", "--json", "--max-new-tokens", "8",
                         "Translate into French: I eat.")
    assert code == 0, err
    assert "\n\n" not in json.loads(out)["text"]


def test_complete_keeps_its_signature(model_dirs):
    from stagewise.model_dir import load_model_dir
    model, tokenizer, _ = load_model_dir(model_dirs[1])
    texts = generate.complete(model, tokenizer, ["Hi", "Is it?"], chat=True, max_new_tokens=4)
    assert len(texts) == 2
    choices = generate.complete(model, tokenizer, ["Hi"], chat=True, max_new_tokens=8,
                                constraint=generate.constrained.choice(["oui", "non"]))
    assert choices[0] in ("oui", "non")


def test_base_few_shot_mixes_constrained_and_free_rows(model_dirs):
    from stagewise.model_dir import load_model_dir
    model, tokenizer, _ = load_model_dir(model_dirs[0])
    demos = [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    two_paragraphs = generate.constrained.regex("[a-z]{1,3}\n\n[a-z]{1,3}")
    out = generate.answers(model, tokenizer, ["q", "r"], chat=False, max_new_tokens=30, demonstrations=demos,
                           constraint=[two_paragraphs, None], temperature=1.0, seed=0)
    # The grammar ends the constrained answer (a blank line inside it is not the end) ...
    assert out[0].stopped and re.fullmatch("[a-z]{1,3}\n\n[a-z]{1,3}", out[0].text)
    # ... and the free one is cut at the blank line that closes an entry.
    assert "\n\n" not in out[1].text


def test_bad_input_exits_2_naming_the_file(model_dirs, capsys, tmp_path):
    base, _ = model_dirs
    bad = tmp_path / "bad_schema.json"
    bad.write_text('{"type": "object", "properties": {"a": {"type": "strng"}}}')
    code, out, err = run(capsys, "--model", base, "--json-schema", bad, "x")
    assert code == 2 and str(bad) in err and "does not compile" in err and "Traceback" not in err and out == ""
    code, _, err = run(capsys, "--model", base, "--json-schema", tmp_path / "missing.json", "x")
    assert code == 2 and "missing.json" in err
    (tmp_path / "broken.json").write_text("{oops")
    code, _, err = run(capsys, "--model", base, "--json-schema", tmp_path / "broken.json", "x")
    assert code == 2 and "broken.json" in err and "not valid JSON" in err
    code, _, err = run(capsys, "--model", base, "--regex", "a(b", "x")
    assert code == 2 and "unclosed group" in err
    code, _, err = run(capsys, "--model", base, "--choice", "a,,b", "x")
    assert code == 2 and "non-empty" in err
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "q"}\n')
    code, _, err = run(capsys, "--model", base, "--few-shot", demos, "x")
    assert code == 2 and f"{demos}, line 1" in err
    code, _, err = run(capsys, "--model", base, "--regex", "a", "--choice", "a,b", "x")
    assert code == 2 and "not allowed with" in err


@pytest.fixture(scope="module")
def reward_dirs(model_dirs, tmp_path_factory):
    """Two reward models on the chat model's decoder with opposite heads: what one ranks first,
    the other ranks last."""
    from stagewise.model_dir import load_language_model
    from stagewise.reward_model import RewardModel
    _, chat = model_dirs
    lm, tokenizer, lineage = load_language_model(chat)
    root = tmp_path_factory.mktemp("reward")
    dirs = []
    for sign in (1.0, -1.0):
        rm = RewardModel.from_language_model(lm, likelihood=True)
        torch.manual_seed(1)
        torch.nn.init.normal_(rm.score.weight, std=3.0)
        rm.score.weight.data.mul_(sign)
        rm.likelihood_weight.data.fill_(sign * 0.5)
        dirs.append(save_model_dir(root / f"rm{sign:+.0f}", rm, tokenizer, lineage + [{"method": "reward_model"}],
                                   config_extra=rm.config_extra(tokenizer.pad_id)))
    return dirs


def test_best_of_n_keeps_the_answer_the_reward_model_scores_highest(model_dirs, reward_dirs, capsys):
    from stagewise.eval import reward_scores
    from stagewise.model_dir import load_language_model, load_reward_model
    _, chat = model_dirs
    lm, tokenizer, _ = load_language_model(chat)
    prompt = "What is 2 + 3?"
    candidates = [a.text for a in generate.answers(lm.eval(), tokenizer, [prompt] * 6, chat=True, max_new_tokens=8,
                                                   temperature=1.0, seed=5)]
    assert len(set(candidates)) > 2  # a real choice to make
    picked = []
    for rm_dir in reward_dirs:
        code, out, err = run(capsys, "--model", chat, "--best-of", "6", "--reward", rm_dir, "--seed", "5",
                             "--temperature", "1.0", "--max-new-tokens", "8", "--best-of-beta", "0", "--json", prompt)
        assert code == 0, err
        result = json.loads(out)
        assert result["methods"] == ["best_of_n"] and result["weights_unchanged"] is True
        scores = reward_scores(load_reward_model(rm_dir)[0], tokenizer, [prompt] * 6, candidates)
        assert result["text"] == candidates[scores.index(max(scores))]
        picked.append(result["text"])
    assert picked[0] != picked[1]  # opposite reward models, opposite picks


def test_best_of_n_regularised_by_likelihood_keeps_the_likelier_answer(model_dirs, reward_dirs, capsys):
    from stagewise.eval import answer_logprobs, reward_scores
    from stagewise.model_dir import load_language_model, load_reward_model
    _, chat = model_dirs
    lm, tokenizer, _ = load_language_model(chat)
    prompt = "What is 2 + 3?"
    candidates = generate.answers(lm.eval(), tokenizer, [prompt] * 6, chat=True, max_new_tokens=8, temperature=1.0,
                                  seed=5)
    logprobs = answer_logprobs(lm, [a.prompt for a in candidates], [a.tokens for a in candidates])
    assert len(set(logprobs)) > 2
    for rm_dir in reward_dirs:
        scores = reward_scores(load_reward_model(rm_dir)[0], tokenizer, [prompt] * 6, [a.text for a in candidates])
        for beta in (0.5, 1000.0):
            code, out, err = run(capsys, "--model", chat, "--best-of", "6", "--reward", rm_dir, "--seed", "5",
                                 "--temperature", "1.0", "--max-new-tokens", "8", "--best-of-beta", str(beta),
                                 "--json", prompt)
            assert code == 0, err
            expected = max(range(6), key=lambda i: scores[i] + beta * logprobs[i])
            assert json.loads(out)["text"] == candidates[expected].text
        # At a large beta the likeliest answer wins whatever the reward model says.
        assert json.loads(out)["text"] == candidates[logprobs.index(max(logprobs))].text


def test_best_of_n_needs_a_reward_model_directory(model_dirs, capsys):
    _, chat = model_dirs
    code, out, err = run(capsys, "--model", chat, "--best-of", "4", "x")
    assert code == 2 and "--best-of N and --reward DIR go together" in err and out == ""
    code, _, err = run(capsys, "--model", chat, "--best-of", "4", "--reward", chat, "x")
    assert code == 2 and f"{chat}: is a language model; expected a reward model directory" in err
