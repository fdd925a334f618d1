"""User-data loaders: each kind of malformed file gives one message naming file and line."""

import json

import pytest

from stagewise import data
from stagewise.errors import StagewiseError


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_trl_conventions_are_read_and_normalised(tmp_path):
    chat = write(tmp_path, "chat.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        "",
        json.dumps({"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4."}),
        json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    "completion": [{"role": "assistant", "content": "Hello"}]}),
    ])
    records = data.load(chat, "chat")
    assert records[1] == {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                                       {"role": "assistant", "content": "2 + 2 = 4."}]}
    assert [m["role"] for m in records[2]["messages"]] == ["system", "user", "assistant"]
    prefs = write(tmp_path, "p.jsonl", [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})])
    assert data.load([prefs], "preference") == [{"prompt": "a", "chosen": "b", "rejected": "c"}]


@pytest.mark.parametrize("kind,lines,message", [
    ("text", ['{"text": "ok"}', '{"text": "broken'], "bad.jsonl, line 2: not valid JSON"),
    ("text", ['{"txt": "ok"}'], "bad.jsonl, line 1: missing field 'text'"),
    ("text", ['{"text": 3}'], "bad.jsonl, line 1: field 'text' must be a string, got int"),
    ("text", ['["text"]'], "bad.jsonl, line 1: expected a JSON object, got list"),
    ("chat", ['{"messages": []}'], "line 1: 'messages' must be a non-empty list"),
    ("chat", ['{"messages": [{"role": "bot", "content": "x"}]}'], "line 1, message 0: role 'bot' is not one of"),
    ("chat", ['{"messages": [{"role": "user", "content": "x"}]}'], "line 1: the conversation has no assistant"),
    ("chat", ['{"prompt": "x"}'], "line 1: expected 'messages', or 'prompt' and 'completion'"),
    ("preference", ['{"prompt": "x", "chosen": "y"}'], "line 1: missing field 'rejected'"),
    ("prompt", ['', '{"prompt": null}'], "line 2: field 'prompt' must be a string, got NoneType"),
    ("text", [], "bad.jsonl: the file holds no records"),
])
def test_malformed_files_name_file_and_line(tmp_path, kind, lines, message):
    path = write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(StagewiseError) as e:
        data.load(path, kind)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(StagewiseError, match="no such file"):
        data.load(tmp_path / "nope.jsonl", "text")


def test_other_formats_go_through_datasets(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,chosen,rejected\nhi,yes,no\n")
    assert data.load(path, "preference") == [{"prompt": "hi", "chosen": "yes", "rejected": "no"}]
