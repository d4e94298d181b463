"""YAML in and out of the config dataclasses: strict parsing, round trips, ``--set`` overrides.

``from_dict`` builds a dataclass from a plain mapping, rejecting unknown keys and wrong types
with the dotted path of the offending key, so a YAML file round-trips exactly:
``from_dict(cls, to_dict(cfg)) == cfg``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` (no dot) as a float, as users write it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with exponent-only floats (``1e-5``) read as floats."""
    return yaml.load(text, Loader=_Loader)


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Checks and converts one YAML value to the annotated type ``tp``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ValueError(f"{path}={value!r} is invalid: expected one of {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={value!r} is invalid: expected a list")
        (item,) = get_args(tp)[:1]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={value!r} is invalid: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}={value!r} is invalid: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}={value!r} is invalid: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}={value!r} is invalid: expected a string")
        return value
    return value


def _renamed(cls: type, data: Mapping, where: str) -> Mapping:
    """``data`` with the keys a class accepts under another name (its ``YAML_ALIASES``, e.g.
    the public Moshi-TTT ``base_lr`` for ``ttt_base_lr``) renamed to the field names."""
    aliases = getattr(cls, "YAML_ALIASES", {})
    if not any(a in data for a in aliases):
        return data
    out = dict(data)
    for alias, name in aliases.items():
        if alias in out:
            if name in out:
                raise ValueError(f"{where}: give {name} or its alias {alias}, not both")
            out[name] = out.pop(alias)
    return out


def _without_foreign(cls: type, data: Mapping, where: str) -> Mapping:
    """``data`` without the keys a class knows from another project but does not implement
    (its ``YAML_FOREIGN``: key -> (the values that mean "off", why)): such a key with an "off"
    value is dropped, any other value is refused with the reason."""
    foreign = getattr(cls, "YAML_FOREIGN", {})
    if not any(k in data for k in foreign):
        return data
    out = dict(data)
    for key, (off, why) in foreign.items():
        if key in out:
            value = out.pop(key)
            if value not in off:
                raise ValueError(f"{where}.{key}={value!r} is not supported: {why} (accepted: "
                                 f"{', '.join(repr(v) for v in off)}, or leave the key out)")
    return out


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Builds the dataclass ``cls`` from a mapping, rejecting unknown keys and bad types.

    Args:
      cls: a config dataclass.
      data: a mapping (for example parsed YAML).
      path: dotted prefix used in error messages.

    Returns:
      The validated, frozen config.
    """
    where = path or cls.__name__
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = _without_foreign(cls, _renamed(cls, data, where), where)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}: "
                         f"allowed keys are {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            no_default = (field.default is dataclasses.MISSING
                          and field.default_factory is dataclasses.MISSING)
            if no_default:
                raise ValueError(f"missing required key {key} in {where}")
            continue
        kwargs[name] = _convert(hints[name], data[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A config dataclass as nested plain dicts (tuples become lists), ready for YAML/JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file at ``path`` (``{}`` for an empty file); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:  # the parser's message spans lines (problem, snippet, caret)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {path} is not valid YAML{where}: {what}") from e
    return data if data is not None else {}


def load_config(path: str | Path, cls: Optional[type[T]] = None) -> T:
    """Reads a YAML file into the dataclass ``cls``; errors name the file and the offending key.

    Without ``cls`` the file is a run config of the architecture its ``architecture:`` key names
    (``ttt_lm`` when absent): see ``ttt_jax.registry``.
    """
    data = read_yaml(path)
    if cls is None and isinstance(data, dict) and "ttt" in data and not (
            {"architecture", "model"} & set(data)):
        from ttt_jax.moshi.config import run_from_ttt_block

        return run_from_ttt_block(data, path)  # a public Moshi-TTT block on its own
    if cls is None:
        from ttt_jax import registry

        cls = registry.run_config_class(data, where=str(path))
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def save_config(cfg: Any, path: str | Path) -> None:
    """Writes ``cfg`` as YAML; ``load_config`` reads back an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _section_type(cls: Any, name: str) -> Any:
    """The dataclass type of field ``name`` of ``cls`` (unwrapping Optional), else None."""
    if not dataclasses.is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(name)
    if get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in get_args(tp) if a is not type(None)), None)
    return tp if dataclasses.is_dataclass(tp) else None


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Applies ``key.sub=value`` overrides (values parsed as YAML) and re-validates.

    Example: ``apply_overrides(cfg, ["model.ttt.use_rope=true", "model.num_layers=2"])``.
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        section = type(cfg)
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"override {item!r}: unknown key {key!r}")
            section = _section_type(section, part)
            if node[part] is None and section is not None:
                node[part] = to_dict(section())  # an optional section left out (e.g. mesh)
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ValueError(f"override {item!r}: unknown key {key!r}")
        node[parts[-1]] = parse_yaml(raw)
    return from_dict(type(cfg), data)
