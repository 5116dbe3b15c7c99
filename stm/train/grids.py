"""The grids a sweep runs: the paper's Table 2 / Table 3 ablations or a YAML grid, and each
variant's full training config.

Plain Python (no Ray, no MLflow), so that ``jobs/sweep.py`` checks every variant of a grid, and
says what is wrong in one line, before a cluster is asked for anything.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stm.config import TrainConfig, UsageError, flat_fields, with_changes

GRIDS = ("table2", "table3")
# Flags a trial may not change: they belong to the sweep as a whole.
SWEEP_LEVEL = ("name", "storage_path", "mlflow_uri", "experiment")


@dataclass(frozen=True)
class Variant:
    """One trial of a sweep: a short name (trial, Train run and MLflow run name; a key of
    ``paper_results.json`` for the built-in grids) and the flags it changes (field names)."""

    name: str
    changes: dict[str, Any]


def _m2a(fusion: str, direction: str = "m2a") -> dict[str, Any]:
    # Table 2 has no temporal filters and no max pooling over time: its residual_mul m2a row
    # is Table 3's first row (8.72 / 37.23), whose "pool time" is unticked.
    return {"fusion": fusion, "direction": direction, "temporal": "none", "time_pool": "avg"}


def table2() -> list[Variant]:
    """Table 2 (Sect. 5.1): how the streams are connected; no temporal filters, average
    pooling over time; plus the unconnected two-stream baseline (late fusion only)."""
    rows = [
        ("direct_add-m2a", "direct_add", "m2a"),
        ("direct_mul-m2a", "direct_mul", "m2a"),
        ("residual_add-m2a", "residual_add", "m2a"),
        ("residual_mul-m2a", "residual_mul", "m2a"),
        ("residual_add-a2m", "residual_add", "a2m"),
        ("residual_mul-a2m", "residual_mul", "a2m"),
        ("residual_mul-bi", "residual_mul", "bi"),
        ("unconnected", "none", "m2a"),
    ]
    return [Variant(name, _m2a(fusion, direction)) for name, fusion, direction in rows]


def table3() -> list[Variant]:
    """Table 3 (Sect. 5.2): temporal filters in the residual_mul m2a network: placement,
    initialisation, and max pooling over time; plus the no-temporal baseline."""
    rows = [
        ("residual_last-avg", "residual_last", "avg", "avg"),
        ("skip_all-avg", "skip_all", "avg", "avg"),
        ("residual_all-avg", "residual_all", "avg", "avg"),
        ("skip_all-center", "skip_all", "center", "avg"),
        ("residual_last-center", "residual_last", "center", "avg"),
        ("residual_all-center", "residual_all", "center", "avg"),
        ("skip_all-center-maxpool", "skip_all", "center", "max"),
        ("residual_all-center-maxpool", "residual_all", "center", "max"),
    ]
    variants = [Variant("no_temporal", _m2a("residual_mul"))]
    for name, temporal, init, pool in rows:
        changes = {"fusion": "residual_mul", "direction": "m2a", "temporal": temporal}
        changes.update(temporal_init=init, time_pool=pool)
        variants.append(Variant(name, changes))
    return variants


BUILTIN = {"table2": table2, "table3": table3}


@dataclass(frozen=True)
class Grid:
    """What a sweep runs: its name (``table2``, ``table3`` or the YAML file's stem), the
    variants, flags applied to every variant, and the report layout (a table name or "")."""

    name: str
    variants: tuple[Variant, ...]
    base: dict[str, Any] = field(default_factory=dict)
    layout: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: what ``sweep.json`` and the parent run's ``grid.json`` hold."""
        return {
            "name": self.name,
            "layout": self.layout,
            "base": self.base,
            "variants": [dataclasses.asdict(v) for v in self.variants],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Grid:
        """The grid of ``to_dict`` output; JSON lists back to the tuples the flags hold, so a
        resumed sweep reports its variants as the first run did."""
        variants = tuple(Variant(v["name"], _tuples(v["changes"])) for v in data["variants"])
        return cls(data["name"], variants, _tuples(data["base"]), data["layout"])


def _tuples(changes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}


def _coerce(where: str, key: str, value: Any, hint: Any) -> Any:
    """A YAML value as the flag's type, or a one-line ``UsageError`` like the CLI's."""
    flag = "--" + key.replace("_", "-")

    def bad(expected: str) -> UsageError:
        return UsageError(f"{where}: {flag}: expected {expected}, got {value!r}")

    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if typing.get_origin(hint) is tuple:
        items = value if isinstance(value, list) else [value]
        item_type = typing.get_args(hint)[0]
        return tuple(_coerce(where, key, v, item_type) for v in items)
    if isinstance(value, bool) or value is None or isinstance(value, list | dict):
        raise bad("a string")
    value = str(value)
    choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
    if choices and value not in choices:
        raise UsageError(
            f"{where}: {flag}: invalid choice {value!r} (choose from {', '.join(choices)})"
        )
    return value


def parse_changes(where: str, changes: Any) -> dict[str, Any]:
    """Validate a mapping of flag -> value (``bn-batch``, ``bn_batch`` or ``--bn-batch``)."""
    if changes is None:
        return {}
    if not isinstance(changes, dict):
        raise UsageError(f"{where}: expected a mapping of flag: value, got {changes!r}")
    hints = flat_fields(TrainConfig)
    out: dict[str, Any] = {}
    for raw, value in changes.items():
        key = str(raw).lstrip("-").replace("-", "_")
        if key not in hints:
            raise UsageError(f"{where}: unknown flag --{key.replace('_', '-')}")
        if key in SWEEP_LEVEL:
            raise UsageError(f"{where}: --{key.replace('_', '-')} is set for the whole sweep")
        out[key] = _coerce(where, key, value, hints[key])
    return out


def _safe_name(text: str) -> str:
    """A file-, Tune- and MLflow-safe variant name."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text).strip("_")[:120] or "variant"


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value) or "none"
    return str(value)


def format_changes(changes: Mapping[str, Any], sep: str = ", ") -> str:
    """``flag=value`` pairs (tuples as ``a-b``): a product variant's name, the report's
    "changes" column."""
    return sep.join(f"{k}={_short(v)}" for k, v in changes.items())


def load_grid(spec: str, only: tuple[str, ...] = ()) -> Grid:
    """``table2``, ``table3`` or a YAML file; ``only`` keeps the named variants. One-line
    ``UsageError`` for anything wrong.

    A YAML grid (every key optional, at least one variant)::

        base: {epochs: 10}                 # flags for every variant
        variants:                          # named variants: name -> flags (or: table2 / table3)
          residual_mul-m2a: {fusion: residual_mul, direction: m2a}
          residual_add-m2a: {fusion: residual_add}
        grid: {lr: [0.001, 0.01]}          # a cartesian product, crossed with the variants
    """
    if spec in BUILTIN:
        grid = Grid(spec, tuple(BUILTIN[spec]()), layout=spec)
    else:
        grid = _load_yaml_grid(spec)
    if only:
        names = {v.name for v in grid.variants}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UsageError(
                f"--only {','.join(unknown)}: no such variant in {grid.name} "
                f"(valid: {', '.join(sorted(names))})"
            )
        grid = dataclasses.replace(grid, variants=tuple(v for v in grid.variants if v.name in only))
    return grid


def _load_yaml_grid(path: str) -> Grid:
    where = f"grid {path}"
    doc = _read_yaml(where, path)
    base = parse_changes(f"{where}: base", doc.get("base"))
    variants, layout = _named_variants(where, doc.get("variants"))
    product = doc.get("grid")
    if product is not None:
        variants, layout = _cross(where, variants, product), ""
    if not variants:
        raise UsageError(f"{where}: no variants (give variants: or grid:)")
    seen: set[str] = set()
    for v in variants:
        if v.name in seen:
            raise UsageError(f"{where}: variant {v.name!r} appears twice")
        seen.add(v.name)
    return Grid(Path(path).stem, tuple(variants), base, layout)


def _read_yaml(where: str, path: str) -> dict[str, Any]:
    """The grid file's top-level mapping, its keys checked."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        hint = " (built-in grids: table2, table3)" if not path.endswith((".yaml", ".yml")) else ""
        raise UsageError(f"{where}: cannot read it: {err.strerror or err}{hint}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise UsageError(f"{where}: not valid YAML: {first[:200]}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a mapping with variants: and/or grid:")
    unknown = sorted(set(doc) - {"base", "variants", "grid"})
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (valid: base, variants, grid)")
    return doc


def _named_variants(where: str, spec: Any) -> tuple[list[Variant], str]:
    """``variants:``: a built-in table (which keeps its report layout) or name -> flags."""
    if spec is None:
        return [], ""
    if isinstance(spec, str):
        if spec not in BUILTIN:
            raise UsageError(f"{where}: variants: {spec!r} is not one of {', '.join(GRIDS)}")
        return BUILTIN[spec](), spec
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: variants: expected a mapping or table2 / table3")
    variants = []
    for name, changes in spec.items():
        safe = _safe_name(str(name))
        if safe != str(name):
            raise UsageError(f"{where}: variant name {name!r}: use letters, digits and _ . = , + -")
        variants.append(Variant(safe, parse_changes(f"{where}: variant {name}", changes)))
    return variants, ""


def _cross(where: str, variants: list[Variant], product: Any) -> list[Variant]:
    """``grid:``: the cartesian product of its values, crossed with the named variants (or
    alone); each combination named by its flags."""
    if not isinstance(product, dict) or not product:
        raise UsageError(f"{where}: grid: expected a mapping of flag: [values]")
    axes = []
    for key, values in product.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UsageError(f"{where}: grid: {key}: no values")
        axes.append([parse_changes(f"{where}: grid", {key: v}) for v in values])
    combos = [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*axes)]
    names = [_safe_name(format_changes(c, ",")) for c in combos]
    if not variants:
        return [Variant(n, c) for n, c in zip(names, combos)]
    return [
        Variant(f"{v.name}_{n}", {**v.changes, **c})
        for v in variants
        for n, c in zip(names, combos)
    ]


def trial_configs(base: TrainConfig, grid: Grid) -> dict[str, TrainConfig]:
    """Each variant's full training config: ``base`` with the grid's base flags, then the
    variant's; invalid combinations are a one-line ``UsageError`` naming the variant."""
    out = {}
    for v in grid.variants:
        try:
            cfg = with_changes(with_changes(base, grid.base), v.changes)
        except UsageError as err:
            raise UsageError(f"grid {grid.name}: variant {v.name}: {err}") from None
        out[v.name] = dataclasses.replace(cfg, name=v.name)
    return out
