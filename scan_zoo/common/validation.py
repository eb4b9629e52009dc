"""Typed, range-checked config fields: the bound is declared beside the field, checked in one place.

A config dataclass declares each field's allowed values in its annotation::

    jitter_hue: Annotated[float, Range(0, 0.5)] = 0.1
    method: Annotated[str, Choice(METHODS)] = "pipeline"
    max_steps: Annotated[Optional[int], Range(1)] = None

:func:`parse_fields` turns raw values (YAML scalars, command-line strings) into the declared types and
checks their bounds; :func:`check_fields` checks an instance built in code. Both are strict where a silent
conversion would change the run: an integer field refuses ``8.9`` and ``true``, a float field refuses
NaN and infinity, ``null`` is accepted only where the field is ``Optional``. Every bad field is reported
at once, in one :class:`~scan_zoo.common.errors.UserError` line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from scan_zoo.common.errors import UserError

INT64_MAX = 2**63 - 1  # every integer reaches torch or numpy eventually
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class Bound:
    """What values a field allows beyond its type: ``ok(value)``, and ``describe()`` for "must be ..."."""

    note: str = ""  # appended to the error line, e.g. the rule several fields share

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


#: the largest float32: optimiser state is float32, so a larger hyper-parameter overflows on the first step
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Range(Bound):
    """``lo <= x <= hi`` (``<`` where open); ``None`` leaves that side unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def ok(self, value) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'greater than' if self.lo_open else 'at least'} {lo}"
        if self.hi is not None:
            return f"{'less than' if self.hi_open else 'at most'} {hi}"
        return "any value"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def Positive(note: str = "") -> Range:
    """``> 0``."""
    return Range(0, lo_open=True, note=note)


def AtLeast(lo: float, note: str = "") -> Range:
    return Range(lo, note=note)


def Probability() -> Range:
    """``0 <= x <= 1``."""
    return Range(0, 1)


@dataclass(frozen=True)
class Choice(Bound):
    """One of a fixed set of values."""

    options: tuple
    note: str = ""

    def ok(self, value) -> bool:
        return value in self.options

    def describe(self) -> str:
        quoted = [repr(o) for o in self.options]
        return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


@dataclass(frozen=True)
class Text(Bound):
    """Any string of at least ``min_len`` characters (a path, a model name)."""

    min_len: int = 0
    note: str = ""

    def ok(self, value) -> bool:
        return len(value) >= self.min_len

    def describe(self) -> str:
        return "a non-empty string" if self.min_len == 1 else f"a string of at least {self.min_len} characters"


# what a value of each type is called in "NAME expects ...": the wording train.py has always used
_TYPE_NAMES = {int: "a int", float: "a finite float", bool: "true or false", str: "a str"}


@dataclass(frozen=True)
class Spec:
    """A field's declared type: ``base`` (int, float, bool, str or tuple), element type of a tuple,
    whether ``None`` is allowed, and its bound (on each element, for a tuple)."""

    base: type
    optional: bool
    bound: Bound | None
    element: type | None = None

    def type_name(self) -> str:
        if self.base is tuple:
            text = f"a list of {_TYPE_NAMES.get(self.element, 'value').split(' ')[-1]}s"
        else:
            text = _TYPE_NAMES.get(self.base, f"a {self.base.__name__}")
        return text + (" or null" if self.optional else "")

    def allowed(self) -> str:
        """What the field takes, for --help: "a int at least 1", "'cpu' or 'device'"."""
        if isinstance(self.bound, (Choice, Text)):
            text = self.bound.describe() + (" or null" if self.optional else "")
        elif self.bound is None or self.bound.describe() == "any value":
            text = self.type_name()
        else:
            text = f"{self.type_name()}{', each' if self.base is tuple else ''} {self.bound.describe()}"
        return text.replace("a int", "an integer")


@functools.lru_cache(maxsize=None)
def field_specs(cls) -> dict[str, Spec]:
    """``{field name: Spec}`` of a config dataclass, read from its annotations (once per class)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        tp, bound = hints[f.name], None
        if typing.get_origin(tp) is typing.Annotated:
            tp, *extras = typing.get_args(tp)
            bound = next((e for e in extras if isinstance(e, Bound)), None)
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args  # X | None
        if optional:
            (tp,) = [a for a in args if a is not type(None)]
        element = None
        if typing.get_origin(tp) is tuple:
            element, tp = typing.get_args(tp)[0], tuple
        out[f.name] = Spec(typing.get_origin(tp) or tp, optional, bound, element)
    return out


def unbounded_fields(cls) -> list[str]:
    """Fields that declare no bound (booleans need none): every other field should declare one."""
    return [n for n, s in field_specs(cls).items() if s.bound is None and s.base is not bool]


class _Bad(Exception):
    pass


def _scalar(value: Any, tp: type, convert: bool) -> Any:
    """``value`` as ``tp``, strictly; raises _Bad. ``convert`` also parses strings (the command line)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if convert and isinstance(value, (str, int)) and str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise _Bad
    if tp is int:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and convert and value.is_integer() and abs(value) < 2**53:
            out = int(value)  # 8.0 from YAML; 8.9 is refused, never truncated
        elif isinstance(value, str) and convert:
            try:
                out = int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise _Bad from None
                if not (f.is_integer() and abs(f) < 2**53):
                    raise _Bad from None
                out = int(f)
        else:
            raise _Bad
        if abs(out) > INT64_MAX:
            raise _Bad
        return out
    if tp is float:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, (int, float)):
            try:
                out = float(value)
            except OverflowError:
                raise _Bad from None
        elif isinstance(value, str) and convert:
            try:
                out = float(value)
            except ValueError:
                raise _Bad from None
        else:
            raise _Bad
        if not math.isfinite(out):
            raise _Bad
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if convert and isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # YAML `output_dir: 2024`
        raise _Bad
    if isinstance(value, tp):
        return value
    if convert:
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise _Bad from None
    raise _Bad


def _show(value: Any, spec: Spec) -> str:
    """The value as the user wrote it, quoted where it is text that does not read as a number."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return repr(value)
    return str(value)


def _one(name: str, value: Any, spec: Spec, convert: bool) -> tuple[Any, str | None]:
    """``(typed value, None)``, or ``(None, "NAME expects a int, not 'x'")`` / ``"NAME must be at least 1, not 0"``."""
    shown = _show(value, spec)
    if value is None:
        return (None, None) if spec.optional else (None, f"{name} expects {spec.type_name()}, not null")
    try:
        if spec.base is tuple:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise _Bad
            out = tuple(_scalar(v, spec.element, convert) for v in value)
            good = spec.bound is None or all(spec.bound.ok(v) for v in out)
        else:
            out = _scalar(value, spec.base, convert)
            good = spec.bound is None or spec.base is bool or spec.bound.ok(out)
    except _Bad:
        return None, f"{name} expects {spec.type_name()}, not {shown}"
    if good:
        return out, None
    note = f" ({spec.bound.note})" if spec.bound.note else ""
    each = "each " if spec.base is tuple else ""
    return None, f"{name} must {'hold values ' if each else 'be '}{spec.bound.describe()}, not {shown}{note}"


def _raise(problems: list[str], what: str) -> None:
    if problems:
        raise UserError(f"bad value{'s' if len(problems) > 1 else ''} in {what}: " + "; ".join(problems))


def parse_fields(cls, values: dict, what: str = "the config") -> dict:
    """Raw ``{field: value}`` (YAML scalars, command-line strings) -> typed values, every bound checked.

    Raises one UserError listing every bad field; unknown names are the caller's to refuse.
    """
    specs, out, problems = field_specs(cls), {}, []
    for name, value in values.items():
        out[name], problem = _one(name, value, specs[name], convert=True)
        if problem:
            problems.append(problem)
    _raise(problems, what)
    return out


def check_fields(obj, what: str = "the config") -> None:
    """Check every field of a config instance against its declared type and bound (no conversion)."""
    problems = []
    for name, spec in field_specs(type(obj)).items():
        value = getattr(obj, name)
        if spec.base is tuple and isinstance(value, list):
            value = tuple(value)
        _, problem = _one(name, value, spec, convert=False)
        if problem:
            problems.append(problem)
    _raise(problems, what)
