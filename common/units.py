"""Distances for people: metres, as every record and table keeps them, typed and shown in
kilometres or statute miles.

One mile is 1609.344 m exactly (the international mile). Everything here is integer
arithmetic on exact fractions: a typed figure is read as decimal text, never as a float, and
turned into whole metres rounded to the nearest metre (a half metre rounds up), so that
``12345.6`` mi is 19,868,317 m (19,868,317.2864 m). Figures shown are rounded the same way to
the unit's tenth, or cut down to it (``floor``), as an odometer shows it.
"""

from __future__ import annotations

import re
from fractions import Fraction

UNITS = ("km", "mi")
#: Metres in one of each unit, exactly.
METRES = {"km": Fraction(1000), "mi": Fraction(1_609_344, 1000)}
UNIT_NAMES = {"km": "kilometres", "mi": "miles"}
#: What a typed figure may be: up to 7 whole digits (an odometer's) and up to 3 decimals.
MAX_TEXT = 32
_FIGURE = re.compile(r"([0-9]{1,7})(?:\.([0-9]{1,3}))?")


def check_unit(value: object) -> str:
    """``km`` or ``mi``; ValueError naming what was given otherwise."""
    if not isinstance(value, str) or value not in UNITS:
        raise ValueError(f"must be km or mi, got {value!r}")
    return value


def _nearest(value: Fraction) -> int:
    """The integer nearest to ``value``; halves away from zero."""
    whole = (abs(value.numerator) * 2 + value.denominator) // (2 * value.denominator)
    return -whole if value < 0 else whole


def to_metres(amount: Fraction | int, unit: str) -> int:
    """``amount`` of ``unit`` in whole metres, to the nearest metre."""
    return _nearest(Fraction(amount) * METRES[check_unit(unit)])


def parse(text: str, unit: str) -> int:
    """A figure as a dashboard shows it (``12345``, ``12345.6``; at most three decimals) in
    ``unit``, as whole metres; ValueError saying what to give otherwise."""
    unit = check_unit(unit)
    m = _FIGURE.fullmatch(text.strip()) if len(text) <= MAX_TEXT else None
    if m is None:
        shown = text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"
        raise ValueError(f"{shown!r}: give whole {UNIT_NAMES[unit]} or up to three decimals, e.g. 12345.6")
    decimals = m.group(2) or ""
    amount = Fraction(int(m.group(1) + decimals), 10 ** len(decimals))
    return to_metres(amount, unit)


def scaled(metres: int, unit: str, places: int, *, floor: bool = False) -> int:
    """``metres`` in ``unit`` times 10**places, as an integer: to the nearest (halves away
    from zero), or cut towards minus infinity with ``floor``."""
    value = Fraction(metres) * 10**places / METRES[check_unit(unit)]
    return value.numerator // value.denominator if floor else _nearest(value)


def decimal_text(metres: int, unit: str, places: int = 3) -> str:
    """``metres`` in ``unit`` as plain decimal text with ``places`` decimals (``1234.568``),
    to the nearest; for files that spreadsheets read."""
    n = scaled(metres, unit, places)
    sign = "-" if n < 0 else ""
    whole, rest = divmod(abs(n), 10**places)
    return f"{sign}{whole}.{rest:0{places}d}" if places else f"{sign}{whole}"


def show(metres: int | None, unit: str, *, floor: bool = False, unknown: str = "unknown") -> str:
    """``12,345.6 km`` or ``7,671.0 mi`` (one decimal, thousands separated); ``unknown`` for None."""
    if metres is None:
        return unknown
    n = scaled(metres, unit, 1, floor=floor)
    sign = "-" if n < 0 else ""
    whole, tenth = divmod(abs(n), 10)
    return f"{sign}{whole:,}.{tenth} {unit}"


def input_text(metres: int, unit: str) -> str:
    """What a form field shows for ``metres``: ``12345.6`` (to the nearest tenth, no separator)."""
    n = scaled(metres, unit, 1)
    return f"{n // 10}.{n % 10}" if n >= 0 else f"-{-n // 10}.{-n % 10}"
