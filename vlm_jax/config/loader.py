"""The one loader: YAML files (with `base:` inheritance) + dotted `key=value` overrides -> typed dataclasses.

Every user mistake raises `ConfigError` with one line naming the key, so the CLI can print it and exit.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from vlm_jax.errors import ConfigError
from vlm_jax.paths import resolve_from, user_path


def check(ok: bool, message: str):
    """Raise a one-line ConfigError when `ok` is false (the validators' single assertion)."""
    if not ok:
        raise ConfigError(message)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str):
    """Convert a YAML value to the annotated type, or raise a one-line ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        last_error = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                last_error = e
        raise last_error
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads exponents without a dot ("1e-6") as strings
            if isinstance(value, str):
                return float(value)
        except ValueError:
            pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain YAML/JSON-friendly dict (tuples become lists)."""
    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(cfg)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (safe_load keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path, seen: tuple[str, ...] = ()) -> dict:
    """A YAML config file (local or gs://) with its `base:` files merged under it (relative to the file)."""
    path = user_path(path, "--config")
    if str(path) in seen:
        raise ConfigError(f"{path}: `base:` includes form a cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_bytes().decode("utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if data is None or data == {}:
        raise ConfigError(f"{path}: the config file is empty; write its sections (or a `base:` to inherit)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    bases = data.pop("base", [])
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_yaml(resolve_from(path.parent, b, f"{path}: base"), seen + (str(path),)))
    return deep_merge(merged, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`data` with each dotted.key=value set; a number indexes a list (train.stages.2.steps=10)."""
    data = dict(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for depth, k in enumerate(keys):
            if isinstance(node, list):
                if not (k.isdigit() and int(k) < len(node)):
                    raise ConfigError(f"override '{item}': '{'.'.join(keys[:depth])}' is a list of {len(node)}; "
                                      f"'{k}' is not an index into it")
                k = int(k)
            if depth == len(keys) - 1:
                node[k] = value
                break
            child = node[k] if isinstance(node, list) else node.get(k)
            node[k] = dict(child) if isinstance(child, dict) else list(child) if isinstance(child, list) else {}
            node = node[k]
    return data
