"""Configuration: dataclasses, YAML presets and dotted `key=value` overrides, validated.

Every command has a config dataclass (nested dataclasses allowed). A preset is a YAML file in
`stagewise/presets/NAME.yaml` holding one section per command (`data:`, `pretrain:`, ...), so
that `stagewise run --preset smoke` and `stagewise pretrain --preset smoke` read the same file.
Values are layered: dataclass defaults, then the preset's section, then command-line overrides
such as `optim.lr=1e-3`. An unknown key or a value of the wrong type is refused with a message
that names the key and what is accepted; nothing is ever executed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stagewise.errors import StagewiseError

PRESET_DIR = Path(__file__).parent / "presets"
T = TypeVar("T")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise StagewiseError(f"unknown preset {name!r}; available presets: {', '.join(preset_names())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise StagewiseError(f"preset {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; convert the safe cases (int to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except StagewiseError as e:
                errors.append(str(e))
        raise StagewiseError(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise StagewiseError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise StagewiseError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise StagewiseError(f"{where}: expected one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise StagewiseError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise StagewiseError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise StagewiseError(f"{where}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise StagewiseError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", base: T | None = None) -> T:
    """Build `cls` from `data`, starting from `base` (or the defaults) for absent keys. `where`
    is the dotted path of `data` inside the whole config, for error messages."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {n: getattr(base, n) for n in names} if base is not None else {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise StagewiseError(f"unknown key {path!r}; accepted keys{' under ' + where if where else ''}: "
                                 f"{', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            values[key] = from_dict(tp, value, path, values.get(key))
        elif typing.get_origin(tp) is dict and isinstance(value, dict):
            # A mapping field is updated key by key (`world.task_weights.json_record=2` keeps the
            # other weights), as a nested config section is.
            current = values[key] if key in values else _default(cls, key)
            values[key] = _coerce({**(current or {}), **value}, tp, path)
        else:
            values[key] = _coerce(value, tp, path)
    return cls(**values)


def _default(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=1e-3` -> (["a", "b"], 0.001). Values are read as YAML scalars or lists."""
    if "=" not in text:
        raise StagewiseError(f"override {text!r}: expected key=value, for example optim.lr=1e-3")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise StagewiseError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)  # YAML 1.1 reads "1e-3" as a string
    return key.split("."), value


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def resolve(cls: type[T], section: str, preset: str | None, overrides: list[str]) -> T:
    """Defaults, then the preset's `section`, then each override, validated at each step."""
    config = cls()
    if preset is not None:
        data = load_preset(preset).get(section) or {}
        try:
            config = from_dict(cls, data, base=config)
        except StagewiseError as e:
            raise StagewiseError(f"preset {preset}, section {section}: {e}") from None
    return resolve_overrides(config, overrides)


def resolve_overrides(config: T, overrides: list[str]) -> T:
    """`config` with each `key=value` override applied in order, validated."""
    for text in overrides:
        path, value = parse_override(text)
        try:
            config = from_dict(type(config), nest(path, value), base=config)
        except StagewiseError as e:
            raise StagewiseError(f"override {text!r}: {e}") from None
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
