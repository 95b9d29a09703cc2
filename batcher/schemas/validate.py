"""Validate one job's parameters against its model, reporting every problem at once.

Values are coerced the way a CSV cell needs (``"0.8"`` -> 0.8, ``"true"`` -> True);
an empty cell or ``None`` counts as "not given", so the server's default applies.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batcher.schemas.spec import ModelSpec, ParamSpec, did_you_mean

_TRUE = frozenset({"true", "t", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "off"})
#: Characters that must not reach a terminal raw (NUL, ESC sequences, line breaks).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def show(value: object, limit: int = 60) -> str:
    """A short, readable rendering of a value for an error message."""
    if isinstance(value, datetime.date | datetime.time):
        text = value.isoformat(" ") if isinstance(value, datetime.datetime) else value.isoformat()
    else:
        text = value if isinstance(value, str) else repr(value)
    if isinstance(value, str) and (
        not value or value != value.strip() or "," in value or _CONTROL.search(value)
    ):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Problem:
    """One broken rule: which parameter, what value, which rule."""

    param: str
    value: object
    rule: str
    #: False where the value says nothing (binary data, a null) or was never given.
    shown: bool = True

    def __str__(self) -> str:
        if not self.shown:
            return f"{self.param} {self.rule}"
        return f"{self.param}={show(self.value)} {self.rule}"


@dataclass(frozen=True)
class Validated:
    """The coerced parameters that were given, and every error and warning found."""

    params: dict[str, Any]
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.errors

    def message(self) -> str:
        return "; ".join(str(p) for p in self.errors)


class _Bad(ValueError):
    """A value could not be coerced; the text is the rule it broke."""

    def __init__(self, rule: str, *, shown: bool = True) -> None:
        super().__init__(rule)
        self.shown = shown


_EXPECTED = {"integer": "an integer", "number": "a number", "boolean": "a boolean"}


def _kind(value: object) -> str | None:
    """What a value that no parameter takes is (typed manifests hold any type), or None."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"binary data ({len(value):,} bytes)"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, datetime.datetime):
        return "a timestamp"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time of day"
    if isinstance(value, datetime.timedelta):
        return "a duration"
    return None


def _unexpected(kind: str, spec: ParamSpec) -> _Bad:
    """One rule saying what was given and what is expected. Binary data is not shown: a
    preview of its bytes tells nothing."""
    shown = not kind.startswith("binary")
    if spec.is_image:
        return _Bad(f"is {kind}: give base64 text, a URL or a file path", shown=shown)
    return _Bad(f"is {kind}, not {_EXPECTED.get(spec.type, 'a string')}", shown=shown)


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


#: A number as a manifest writes it: ASCII digits, an optional sign, point and exponent.
#: int() and float() take more ("1_0" is 10, Arabic-Indic and full-width digits, "nan"):
#: a typo there would be sent as some other value.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _numeral(value: str, rule: str) -> str:
    """``value`` stripped, if it is written as a number; else :class:`_Bad` with ``rule``."""
    text = value.strip()
    if not _NUMBER.fullmatch(text):
        raise _Bad(rule)
    return text


def _to_int(value: object) -> int:
    if isinstance(value, bool):
        raise _Bad("is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise _Bad("is not an integer")
    if isinstance(value, str):
        text = _numeral(value, "is not an integer")
        try:
            return int(text)
        except ValueError:
            pass
        number = float(text)
        if number.is_integer():
            return int(number)
    raise _Bad("is not an integer")


def _to_number(value: object) -> float | int:
    if isinstance(value, bool):
        raise _Bad("is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        number = float(_numeral(value, "is not a number"))
    else:
        raise _Bad("is not a number")
    if not math.isfinite(number):
        raise _Bad("is not a finite number")
    return number


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    # 1.0 as an integer reads it: pandas makes an integer column with a gap float.
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if _NUMBER.fullmatch(text) and float(text) in (0, 1):
            return bool(float(text))
    raise _Bad("is not a boolean (use true or false)")


def _to_str(value: object, spec: ParamSpec) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _Bad("is not a string")
    text = str(value)
    if spec.is_image and not text.strip():
        raise _Bad("is empty")
    # A name from a list (" png" after a CSV comma) is read like a number: stripped. Free
    # text (a prompt) is sent as written.
    return text.strip() if spec.enum is not None else text


def coerce(value: object, spec: ParamSpec) -> object:
    """The value converted to the parameter's type, or :class:`ValueError` with the rule."""
    kind = _kind(value)
    if kind is not None:
        raise _unexpected(kind, spec)
    if spec.type == "integer":
        return _to_int(value)
    if spec.type == "number":
        return _to_number(value)
    if spec.type == "boolean":
        return _to_bool(value)
    return _to_str(value, spec)


def _range_problem(value: float, spec: ParamSpec) -> str | None:
    if spec.minimum is not None and value < spec.minimum:
        return f"is below the minimum {show(spec.minimum)}"
    if spec.maximum is not None and value > spec.maximum:
        return f"is above the maximum {show(spec.maximum)}"
    return None


def _not_given(name: str, value: object) -> Problem:
    """A required parameter with no value: say what stood in its place."""
    if isinstance(value, str) and value:
        return Problem(name, value, "is only whitespace: a value is required")
    if value is _ABSENT:
        what = "missing"
    elif value is None:
        what = "null"
    elif isinstance(value, float):
        what = "NaN"
    else:
        what = "empty"
    return Problem(name, value, f"is {what}: a value is required", shown=False)


_ABSENT = object()


def _enum_rule(value: object, coerced: object, enum: tuple[str, ...]) -> str:
    allowed = ", ".join(enum[:6]) + (", ..." if len(enum) > 6 else "")
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        # A number where a name goes (style=3): "did you mean" would only guess.
        return f"is a number where a name is expected (one of {allowed})"
    return f"is not one of the allowed values ({allowed}){did_you_mean(str(coerced), enum)}"


def validate(
    model: ModelSpec, raw: Mapping[str, object], *, blanks: Mapping[str, object] | None = None
) -> Validated:
    """Check and coerce one job's parameters; never raises for a bad value. ``blanks``:
    cells given empty that ``raw`` leaves out (a manifest row's), named if required."""
    params: dict[str, Any] = {}
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for name, value in raw.items():
        spec = model.params.get(name)
        if spec is None:
            hint = did_you_mean(name, model.params)
            errors.append(Problem(name, value, f"is not a parameter of {model.slug}{hint}"))
            continue
        if _is_missing(value):
            if value is None and spec.nullable:
                params[name] = None
            continue
        try:
            coerced = coerce(value, spec)
        except ValueError as exc:
            shown = not isinstance(exc, _Bad) or exc.shown
            errors.append(Problem(name, value, str(exc), shown=shown))
            continue
        if isinstance(coerced, int | float) and not isinstance(coerced, bool):
            problem = _range_problem(coerced, spec)
            if problem:
                errors.append(Problem(name, value, problem))
                continue
        if spec.enum is not None and coerced not in spec.enum:
            rule = _enum_rule(value, coerced, spec.enum)
            if spec.enum_strict:
                errors.append(Problem(name, value, rule))
                continue
            sent = f" as {json.dumps(coerced)}" if coerced != value else ""
            warnings.append(Problem(name, value, f"{rule}; sent anyway{sent}, the server decides"))
        params[name] = coerced
    reported = {p.param for p in errors}
    for name in model.required_params:
        if name not in params and name not in reported:
            given = raw.get(name, (blanks or {}).get(name, _ABSENT))
            errors.append(_not_given(name, given))
    return Validated(params, tuple(errors), tuple(warnings))
