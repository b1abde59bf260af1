"""Settings on the command line: a dataclass of settings (such as `TrainConfig`) built from a
named recipe, then a JSON file, then `--key=value` overrides, each later layer winning.

    make_settings(TrainConfig, RECIPES["tiny"], overrides=["--lr=3e-4", "--model.d-model=192"])

Every value is read as the type its field declares (`int | None` also accepts "none"), and
checked against it when it comes from a file. A field holding a dict of another dataclass's
settings (TrainConfig.model holds ModelConfig values) is reached with `--field.key=value`.
Options are written with dashes (--out-dir); underscores are accepted too.
"""

import dataclasses
import inspect
import json
import re
import types
import typing
from pathlib import Path

from lilllm import LilllmError
from lilllm.config import check_keys


def make_settings(cls, base: dict, config_file=None, overrides=(), nested: dict | None = None):
    """`cls` from the values of `base`, updated with a JSON file (if given) and then with
    `--key=value` overrides. `nested` maps a dict-valued field to the dataclass whose
    settings it holds ({"model": ModelConfig}), for `--model.key=value`."""
    nested = nested or {}
    values = json.loads(json.dumps(base))  # a deep copy
    if config_file is not None:
        values.update(_read_file(config_file))
    for item in overrides:
        key, text = _split(item)
        field, dot, name = key.partition(".")
        if dot and field in nested:
            hints = typing.get_type_hints(nested[field])
            if name not in hints:
                raise LilllmError(f"unknown setting --{dashed(key)}: known ones are "
                                  f"{', '.join(f'{field}.{dashed(n)}' for n in hints)}")
            values.setdefault(field, dict(getattr(cls(), field)))
            values[field][name] = _parse(key, text, hints[name])
        else:
            hints = typing.get_type_hints(cls)
            if key not in hints:
                raise LilllmError(f"unknown setting --{dashed(key)}: known settings are "
                                  f"{', '.join(map(dashed, hints))}" + "".join(f" and {f}.KEY" for f in nested))
            values[key] = _parse(key, text, hints[key])
    return settings_from_dict(cls, values, nested)


def settings_from_dict(cls, values: dict, nested: dict | None = None):
    """A checked `cls` from plain values (a recipe, a JSON file, a checkpoint)."""
    check_keys(cls, values, "the settings")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _has_type(value, hints[key]):
            raise LilllmError(f"setting {key}={value!r} has the wrong type: expected {_type_name(hints[key])}")
    for field, inner in (nested or {}).items():
        inner_values = values.get(field, {})
        check_keys(inner, inner_values, f"the {field} settings")
        inner_hints = typing.get_type_hints(inner)
        for name, value in inner_values.items():
            if name != "layers" and not _has_type(value, inner_hints[name]):  # ModelConfig checks its layers
                raise LilllmError(f"setting {field}.{name}={value!r} has the wrong type: expected "
                                  f"{_type_name(inner_hints[name])}")
    return cls(**values)


def dashed(key: str) -> str:
    """A setting's name as the command line writes it: out_dir → out-dir."""
    return key.replace("_", "-")


def field_notes(cls) -> dict[str, str]:
    """{field: the comment at the end of its line} in the source of the dataclass `cls`: the
    one line of meaning `--help` shows beside each setting, so that help cannot go stale."""
    names = {f.name for f in dataclasses.fields(cls)}
    notes = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^#]*#\s*(.+)", line)
        if match and match.group(1) in names:
            notes[match.group(1)] = match.group(2).strip()
    return notes


def settings_help(settings, prefix: str = "", skip=()) -> str:
    """One line per field of the dataclass instance `settings`: `--{prefix}key=value` with its
    value as the command line spells it, then the field's comment (`field_notes`)."""
    notes = field_notes(type(settings))
    lines = []
    for field in dataclasses.fields(settings):
        if field.name in skip:
            continue
        option = f"  --{prefix}{dashed(field.name)}={spelt(getattr(settings, field.name))}"
        note = notes.get(field.name, "")
        lines.append(f"{option:<34} {note}" if len(option) < 34 else f"{option}\n{'':<34} {note}")
    return "\n".join(line.rstrip() for line in lines)


def spelt(value) -> str:
    """A setting's value as `--key=value` writes it: none, true, 0.002, {"n_layers": 2}."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if value is None or isinstance(value, (bool, dict, list)):
        return json.dumps(value).replace("null", "none")
    return str(value)


def _read_file(path) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LilllmError(f"config file {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LilllmError(f"config file {path} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise LilllmError(f"config file {path} must hold a JSON object of setting: value pairs")
    return values


def _split(item: str) -> tuple[str, str]:
    key, equals, text = item.removeprefix("--").partition("=")
    if not item.startswith("--") or not equals or not key:
        raise LilllmError(f"cannot read {item!r}: write settings as --key=value, e.g. --lr=3e-4 or --model.d-model=192")
    return key.replace("-", "_"), text


def _options(hint) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _parse(key: str, text: str, hint):
    """The value of `--key=text`, of the setting's type."""
    options = _options(hint)
    if text.lower() in ("none", "null") and type(None) in options:
        return None
    for kind in options:
        if kind is bool and text.lower() in ("true", "1", "yes", "false", "0", "no"):
            return text.lower() in ("true", "1", "yes")
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                continue
        if kind is str:
            return text
        if kind in (dict, list) or typing.get_origin(kind) in (dict, list) or dataclasses.is_dataclass(kind):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                continue
    raise LilllmError(f"--{dashed(key)}={text}: expected {_type_name(hint)}")


def _has_type(value, hint) -> bool:
    for kind in _options(hint):
        kind = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is not type(None) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return True
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):  # nested settings (moe): checked by their class
            return True
    return False


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("NoneType", "none")
