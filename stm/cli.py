"""Command lines generated from the config dataclasses (only ``jobs/`` import this module).

Every field is a flag whose help is the field's comment and its default; a wrong value is one
line on stderr and exit status 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Literal, NoReturn

from stm.config import UsageError, field_help, with_changes

__all__ = [
    "OneLineParser",
    "UsageError",
    "add_config_flags",
    "build_config",
    "fail",
    "parse_config",
    "parser_for",
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the program name and the reason)."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


def fail(prog: str, message: str, status: int = 2) -> NoReturn:
    """One line on stderr and exit ``status`` (2: bad input; 1: the work itself failed)."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(status)


def _optional(hint: Any) -> Any:
    """``X`` of ``X | None``, else ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value) or "none"
    if value == "":
        return '""'
    return str(value)


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    positional: tuple[str, ...] = (),
) -> None:
    """One ``--kebab-case`` flag per field of ``cls`` (nested dataclasses flattened), with
    ``default=SUPPRESS`` so that only what the user typed overrides the preset; ``positional``
    fields are positional arguments instead."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_config_flags(parser, hint, skip=skip)
            continue
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS}
        base = _optional(hint)
        if typing.get_origin(base) is Literal:
            kwargs["choices"] = typing.get_args(base)
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            kwargs.update(nargs="*", type=typing.get_args(base)[0])
        else:
            kwargs["type"] = base
        text = helps.get(f.name, "")
        help_text = f"{text} (default: {_show(_field_default(f))})".lstrip()
        kwargs["help"] = help_text.replace("%", "%%")  # argparse formats help with %
        if f.name in positional:
            kwargs.pop("default")
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def parser_for(prog: str, doc: str) -> OneLineParser:
    """A one-line-error parser with the job's docstring as its description."""
    return OneLineParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def build_config(prog: str, preset: Any, values: dict[str, Any]) -> Any:
    """``preset`` with the parsed flags applied, or one line and exit 2."""
    try:
        return with_changes(preset, values)
    except UsageError as err:
        fail(prog, str(err).splitlines()[0])


def parse_config(
    prog: str,
    doc: str,
    cls: type,
    argv: list[str] | None,
    *,
    required: tuple[str, ...] = (),
    positional: tuple[str, ...] = (),
) -> Any:
    """A job's whole command line as one config of ``cls``: the ``required`` flags and the
    ``positional`` arguments make the preset, every other flag changes it."""
    parser = parser_for(prog, doc)
    add_config_flags(parser, cls, positional=positional)
    values = vars(parser.parse_args(argv))
    for name in required:
        if name not in values:
            fail(prog, f"--{name.replace('_', '-')} is required")
    try:
        preset = cls(**{name: values[name] for name in (*required, *positional)})
    except UsageError as err:
        fail(prog, str(err).splitlines()[0])
    return build_config(prog, preset, values)
