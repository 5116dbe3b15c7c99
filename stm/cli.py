"""Command lines generated from the config dataclasses: every field is a flag, and a wrong
value is one line on stderr and exit status 2 (never a traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, NoReturn

from stm import config as C

CHOICES: dict[str, tuple[str, ...]] = {
    "appearance_arch": C.ARCHS,
    "motion_arch": C.ARCHS,
    "fusion": C.FUSIONS,
    "direction": C.DIRECTIONS,
    "temporal": C.TEMPORALS,
    "temporal_init": C.TEMPORAL_INITS,
    "time_pool": C.TIME_POOLS,
    "stage": C.STAGES,
    "test_mode": C.TEST_MODES,
    "crop": C.CROPS,
    "decode": C.DECODES,
}


class UsageError(ValueError):
    """A wrong command line or config value: one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the program name and the reason)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def fail(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    """One ``--kebab-case`` flag per field of ``cls`` (nested dataclasses flattened), with
    ``default=SUPPRESS`` so that only what the user typed overrides the preset."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_config_flags(parser, hint, skip)
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        if hint is bool or hint == (bool | None):  # None: the field's own "auto"
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kwargs.update(nargs="*", type=typing.get_args(hint)[0])
        else:
            kwargs["type"] = hint
        parser.add_argument(flag, **kwargs)


def apply_flags(preset: Any, values: dict[str, Any]) -> Any:
    """``preset`` with the typed flags applied (nested model fields included); config
    validation errors become ``UsageError``."""
    model_fields = {f.name for f in dataclasses.fields(C.ModelConfig)}
    model_changes = {k: v for k, v in values.items() if k in model_fields}
    changes = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in values.items()
        if k not in model_fields
    }
    try:
        if model_changes:
            changes["model"] = dataclasses.replace(preset.model, **model_changes)
        return dataclasses.replace(preset, **changes)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err).splitlines()[0]) from None
