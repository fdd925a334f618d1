"""Loading user data in the TRL conventions, validated record by record.

| kind        | fields                                               | used by         |
|-------------|------------------------------------------------------|-----------------|
| text        | {"text"}                                             | pretrain        |
| chat        | {"messages": [{"role", "content"}, ...]} or          | sft             |
|             | {"prompt", "completion"} (strings or message lists)  |                 |
| preference  | {"prompt", "chosen", "rejected"}                     | reward, dpo     |
| prompt      | {"prompt"}                                           | ppo             |
| eval        | {"task", "prompt", "reference"}                      | eval            |

JSONL is read here; other formats (`.parquet`, `.csv`, `.json` with a list) go through the
`datasets` library when it is installed. Every problem is reported as one StagewiseError that
names the file, the line and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stagewise.errors import StagewiseError

KINDS = ("text", "chat", "preference", "prompt", "eval")
ROLES = ("system", "user", "assistant")


def read_records(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of a JSONL file; other formats via
    `datasets` with the row index + 1 as line number."""
    if not path.is_file():
        raise StagewiseError(f"{path}: no such file")
    if path.suffix in (".jsonl", ".ndjson", ""):
        records = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise StagewiseError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        return records
    try:
        import datasets
    except ImportError:
        raise StagewiseError(f"{path}: only JSONL is supported without the `datasets` library") from None
    builder = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(path.suffix)
    if builder is None:
        raise StagewiseError(f"{path}: unsupported format {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types; the message is what matters here
        raise StagewiseError(f"{path}: could not be read as {builder}: {e}") from None
    return [(i + 1, dict(row)) for i, row in enumerate(rows)]


def _string(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise StagewiseError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise StagewiseError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str, need_assistant: bool = True) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise StagewiseError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, message in enumerate(value):
        here = f"{where}, message {i}"
        if not isinstance(message, dict):
            raise StagewiseError(f"{here}: expected an object with 'role' and 'content'")
        role, content = _string(message, "role", here), _string(message, "content", here)
        if role not in ROLES:
            raise StagewiseError(f"{here}: role {role!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise StagewiseError(f"{where}: the conversation has no assistant message to learn from")
    return out


def _as_turns(value: Any, role: str, where: str, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(value, f"{where}, field {key!r}", need_assistant=False)
    raise StagewiseError(f"{where}: field {key!r} must be a string or a list of messages")


def validate(record: Any, kind: str, where: str) -> dict:
    """One record checked and normalised; chat records always come out as {"messages"}."""
    if not isinstance(record, dict):
        raise StagewiseError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if kind == "text":
        text = _string(record, "text", where)
        if not text.strip():
            raise StagewiseError(f"{where}: field 'text' is empty")
        return {"text": text}
    if kind == "chat":
        if "messages" in record:
            return {"messages": _messages(record["messages"], where)}
        if "prompt" in record and "completion" in record:
            turns = _as_turns(record["prompt"], "user", where, "prompt")
            turns += _as_turns(record["completion"], "assistant", where, "completion")
            return {"messages": _messages(turns, where)}
        raise StagewiseError(f"{where}: expected 'messages', or 'prompt' and 'completion'")
    if kind == "preference":
        return {key: _string(record, key, where) for key in ("prompt", "chosen", "rejected")}
    if kind == "prompt":
        return {"prompt": _string(record, "prompt", where)}
    if kind == "eval":
        out = {key: _string(record, key, where) for key in ("task", "prompt", "reference")}
        if "schema" in record:
            out["schema"] = record["schema"]
        return out
    raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")


def load(paths: list[Path] | Path, kind: str) -> list[dict]:
    """Every record of every file, validated as `kind`. An empty result is an error."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    out = []
    for path in map(Path, paths):
        records = read_records(path)
        if not records:
            raise StagewiseError(f"{path}: the file holds no records")
        out += [validate(record, kind, f"{path}, line {number}") for number, record in records]
    if not out:
        raise StagewiseError("no data files given")
    return out
