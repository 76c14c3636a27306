"""Command-line flags generated from a typed config dataclass, so that a field and its flag cannot
drift apart: `--<prefix><field>` for every field (underscores as dashes), typed from the field's
annotation (int, float, str, bool, a Literal's choices, optional of those), with the comments
written beside or above the field in its class as the flag's help."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(hint: Any) -> tuple[Any, tuple | None] | None:
    """(argparse type, choices) for a field's annotation; None for one a flag cannot carry."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else None
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        return type(choices[0]), choices
    if hint is bool:
        return _bool, None
    if hint in (int, float, str):
        return hint, None
    return None


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comments in the class source (and its bases'): the lines just above it and the
    one beside it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        out.update(_own_comments(klass))
    return out


def _own_comments(cls: type) -> dict[str, str]:
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = re.match(r"\s+(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "@")):
            out[m.group(1)] = " ".join(above + ([m.group(2)] if m.group(2) else []))
        above = []
    return out


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", defaults: Any = None,
                         skip: tuple[str, ...] = (), help: dict[str, str] | None = None) -> None:
    """Flags for `cls`'s fields. defaults: an instance whose values the flags show (None: no
    default, so that an unset flag reads None and a preset's value stands)."""
    hints = get_type_hints(cls)
    help = {**field_comments(cls), **(help or {})}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typed = _flag_type(hints[f.name])
        if typed is None:
            continue
        kind, choices = typed
        default = getattr(defaults, f.name) if defaults is not None else None
        text = help.get(f.name, "").replace("%", "%%")
        if defaults is not None:
            text = f"{text} (default {default})".strip()
        switch = {"nargs": "?", "const": True, "metavar": "BOOL"} if kind is _bool else {}  # `--fsdp` = `--fsdp true`
        parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{prefix.replace('-', '_')}{f.name}",
                            type=kind, choices=choices, default=default, help=text or None, **switch)


def config_from_arguments(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields given on the command line (those not None), by field name."""
    dest = prefix.replace("-", "_")
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f"{dest}{f.name}", None)
        if value is not None:
            out[f.name] = value
    return out
