"""The config reference of ``ttt-jax train --help``, generated from the config dataclasses.

For every registered architecture (``ttt_jax.registry``) its run-config class is walked
field by field (``dataclasses.fields``, recursively into sections): the dotted key, its type,
its default and the first sentence of its ``Attributes:`` entry in the class docstring. A
section class already listed (``optim``, ``train``, ... shared by every architecture) is named
once and then referred to.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

WIDTH = 100
INDENT = "  "
HANGING = "      "


def attribute_docs(cls: type) -> dict[str, str]:
    """``field -> description`` from the ``Attributes:`` section of ``cls``'s docstring (an
    entry ``b1, b2, eps: ...`` describes each of the three; a section named in such a shared
    entry is described by its own class docstring instead, see ``walk``)."""
    doc = typing.cast(str, cls.__doc__ or "")
    lines = doc.expandtabs().splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    indent, names = None, []
    for line in lines[start + 1:]:
        if not line.strip():
            if indent is not None:
                break
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        entry = re.match(r"\s*([\w, ]+):\s*(.*)", line) if depth == indent else None
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for n in names:
                out[n] = entry.group(2).strip()
                if len(names) > 1:
                    out[f"{n} shared"] = out[n]
        else:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}"
    return out


def first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (not "e.g."), without RST markup or
    section citations such as "(docs/architecture.md §1)"."""
    text = re.sub(r"\s*\([^()]*§[\d.-]+\)", "", text.replace("``", ""))
    match = re.match(r"(.+?(?<!e\.g)(?<!i\.e)\.)(?=\s+[A-Z(]|$)", text)
    return match.group(1) if match else text


def type_name(tp: Any) -> str:
    """A YAML user's name for an annotated type: ``int``, ``'a' | 'b'``, ``list of int``, ..."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return " | ".join(type_name(a) for a in inner) + " | null"
    if origin in (tuple, list):
        return f"list of {type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"section {tp.__name__}"
    return getattr(tp, "__name__", str(tp))


def _section(tp: Any) -> Any:
    """The dataclass of a section field (unwrapping ``Optional``), else ``None``."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in get_args(tp) if a is not type(None)), None)
    return tp if dataclasses.is_dataclass(tp) else None


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "defaults below"
    if isinstance(value, tuple):
        value = list(value)
    return "default " + json.dumps(value)


def _line(key: str, what: str, description: str) -> str:
    text = f"{key} ({what})" + (f": {description}" if description else "")
    return textwrap.fill(text, WIDTH, initial_indent=INDENT, subsequent_indent=HANGING)


def walk(cls: type, prefix: str = "", seen: dict | None = None) -> list[str]:
    """Reference lines of every field of ``cls`` (recursively); ``seen`` maps a section class
    already listed to its key, which later sections of that class point to."""
    seen = {} if seen is None else seen
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    out = []
    for field in dataclasses.fields(cls):
        key, tp = prefix + field.name, hints[field.name]
        description = first_sentence(docs.get(field.name, ""))
        section = _section(tp)
        if section is None:
            out.append(_line(key, f"{type_name(tp)}, {_default(field)}", description))
            continue
        optional = "absent by default" if field.default is None else _default(field)
        if section in seen:
            out.append(_line(key, f"section {section.__name__}, {optional}",
                             f"keys as under {seen[section]} above"))
            continue
        seen[section] = key
        if not description or f"{field.name} shared" in docs:
            description = first_sentence((section.__doc__ or "").strip().splitlines()[0])
        out.append(_line(key, f"section {section.__name__}, {optional}", description))
        out.extend(walk(section, key + ".", seen))
    return out


def config_reference() -> str:
    """The reference of every registered architecture's run config, as ``--help`` shows it."""
    from ttt_jax import registry

    groups: dict[type, list] = {}
    default_first = sorted(registry.names(), key=lambda n: n != registry.DEFAULT_ARCHITECTURE)
    for name in default_first:
        arch = registry.get(name)
        groups.setdefault(arch.run_config, []).append(arch)
    seen: dict = {}
    parts = [textwrap.fill("config keys (YAML sections; override any with --set KEY=VALUE, "
                           "values in YAML), by architecture (the architecture: key):", WIDTH)]
    for cls, archs in groups.items():
        head = ", ".join(a.name for a in archs) + f" ({cls.__name__}): " + "; ".join(
            f"{a.name}: {a.description}" for a in archs if a.description)
        parts.append("\n" + textwrap.fill(head, WIDTH))
        parts.extend(walk(cls, "", seen))
    return "\n".join(parts)
