"""Filtering and sorting the run index's rows (`slimtune runs list --where / --sort / --columns`).

A column is a key of the decoded index row (`best_accuracy`, `test_macro_f1`, `energy_kwh`,
`train_seconds`, `status`, ...; a bare metric name means its `best_` value), or a config key by its
dotted path (`train.lr`, `method.r`, `train.seed`). A `--where` value is read by the column's kind:
a number for a number column (a value that is not one is an error, never a text comparison), yes /
no for a yes-no column, and text, with = or != only, for a text column.
"""
from __future__ import annotations

import re

from ..errors import UsageError
from .runinfo import flat

_WHERE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|!=|==|=|>|<)\s*([^<>=!\s].*?)\s*$")
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
        "=": lambda a, b: a == b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
_NOT_COLUMNS = ("cost", "config")  # whole JSON objects: their parts are columns (energy_kwh, train.lr, ...)
_HIDDEN = ("key", "parent_key", "problem")
_NUMBER_COLUMNS = ("monitor_value", "started", "ended", "wall_seconds", "train_seconds", "energy_kwh", "co2_kg",
                   "cpu_seconds", "gpu_seconds", "flops", "samples_seen", "tokens_seen", "host_peak_rss_mb",
                   "device_peak_mb", "runs")
_YES, _NO = ("true", "yes", "1"), ("false", "no", "0")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def value(row: dict, column: str):
    """The row's value of a column: an index column, or a config key by its dotted path."""
    if column in row:
        return row[column]
    if "." in column:
        return flat(row.get("config") or {}).get(column)
    return None


def _config_keys(all_rows: list[dict]) -> set[str]:
    return set().union(*(flat(r.get("config") or {}) for r in all_rows)) if all_rows else set()


def resolve_column(name: str, all_rows: list[dict]) -> str:
    """A column name as the user wrote it: exact, a metric name meaning its best_ value, or a config key."""
    keys = set().union(*(r.keys() for r in all_rows)) - set(_NOT_COLUMNS) if all_rows else set()
    if name in keys:
        return name
    if f"best_{name}" in keys:
        return f"best_{name}"
    if name == "started" or not all_rows:
        return name
    config_keys = _config_keys(all_rows)
    if name in config_keys:
        return name
    shown = sorted(k for k in keys if k not in _HIDDEN)
    near = sorted(k for k in config_keys if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1])
    examples = near or sorted(config_keys)[:3] or ["train.lr"]
    raise UsageError(f"unknown column {name!r}" + (f" (did you mean {' or '.join(near)}?)" if near else "")
                     + f"; columns: {', '.join(shown)}; or a config key by its dotted path "
                     f"({', '.join(examples)}, ...)")


def parse_where(expr: str) -> tuple[str, str, str]:
    """'test_accuracy>=0.9' -> ('test_accuracy', '>=', '0.9'); the value is read by `select`, which knows the column."""
    m = _WHERE.match(expr)
    if not m:
        raise UsageError(f"--where {expr!r}: expected COLUMN OP VALUE with OP one of >=, <=, >, <, =, != "
                         f"(for example 'test_accuracy>=0.9' or 'energy_kwh<0.01')")
    key, op, raw = m.groups()
    return key, op, raw.strip("'\"")


def column_kind(column: str, all_rows: list[dict]) -> str:
    """'number', 'yes-no' or 'text', from the values the rows hold (or the column's name when none has one)."""
    vals = [v for v in (value(r, column) for r in all_rows) if v is not None]
    if any(_number(v) for v in vals):
        return "number"
    if vals and all(isinstance(v, bool) for v in vals):
        return "yes-no"
    if vals:
        return "text"
    return "number" if column in _NUMBER_COLUMNS or column.split("_", 1)[0] in ("best", "final", "test") else "text"


def where_filter(expr: str, all_rows: list[dict]):
    """(column, keep(row) -> bool) for one --where expression; a value the column cannot hold is an error."""
    name, op, raw = parse_where(expr)
    column = resolve_column(name, all_rows)
    kind = column_kind(column, all_rows)
    said = name if name == column else f"{name} (= {column})"
    if kind == "number":
        try:
            target = float(raw)
        except ValueError:
            raise UsageError(f"--where {expr!r}: {said} is a number column and {raw!r} is not a number; give a number "
                             f"such as 0.9, 12 or 1e-3 (a decimal point, not a comma)") from None
        return column, lambda r: _number(value(r, column)) and _OPS[op](value(r, column), target)
    if op not in ("=", "==", "!="):
        raise UsageError(f"--where {expr!r}: {said} is a {kind} column; compare it with = or != "
                         f"(for example '{column}={'yes' if kind == 'yes-no' else raw}')")
    if kind == "yes-no":
        if raw.lower() not in _YES + _NO:
            raise UsageError(f"--where {expr!r}: {said} is a yes-no column and {raw!r} is neither; give one of "
                             f"{', '.join(_YES + _NO)}")
        target = raw.lower() in _YES
        return column, lambda r: isinstance(value(r, column), bool) and _OPS[op](value(r, column), target)
    return column, lambda r: value(r, column) is not None and _OPS[op](str(value(r, column)), raw)


def select(all_rows: list[dict], task=None, model=None, method=None, status=None, sweep=None, kind=None,
           where: list[str] | None = None, sort: str | None = None, descending: bool | None = None) -> list[dict]:
    out = list(all_rows)
    if task:
        out = [r for r in out if r["task"] == task]
    if model:
        out = [r for r in out if r["model"] and model.lower() in r["model"].lower()]
    if method:
        out = [r for r in out if r["method"] == method]
    if status:
        out = [r for r in out if r["status"] == status]
    if sweep:
        out = [r for r in out if r["parent"] == sweep or (r["parent_key"] or "") == sweep]
    if kind:
        out = [r for r in out if r["kind"] == kind]
    for expr in where or []:
        _, keep = where_filter(expr, all_rows)
        out = [r for r in out if keep(r)]
    if sort:
        key = resolve_column(sort, all_rows)
        desc = descending if descending is not None else False
        present = [r for r in out if value(r, key) is not None]
        absent = [r for r in out if value(r, key) is None]
        numeric = all(_number(value(r, key)) for r in present)
        present.sort(key=(lambda r: value(r, key)) if numeric else (lambda r: str(value(r, key))), reverse=desc)
        out = present + absent  # runs without the value go last either way
    else:  # newest first
        out.sort(key=lambda r: r.get("started") or r.get("ended") or 0,
                 reverse=True if descending is None else descending)
    return out
