"""Canonical JSON for signed payloads: sorted keys, no spaces, UTF-8, integers only.

Decoding is bounded before anything is parsed: the size of the input, the depth of its
nesting and the digits of each integer, so that no input can cost more than its size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Set
from typing import Any

from protocol.errors import BadFormat


def _check(value: Any, path: str) -> None:
    if isinstance(value, float):
        raise BadFormat(f"{path}: floats are not allowed in a signed payload")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BadFormat(f"{path}: object keys must be strings")
            _check(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
    elif value is not None and not isinstance(value, (str, int, bool)):
        raise BadFormat(f"{path}: {type(value).__name__} cannot be encoded")


def dumps(obj: dict[str, Any]) -> bytes:
    """Encode ``obj`` canonically; raises :class:`BadFormat` on floats."""
    _check(obj, "payload")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _no_floats(text: str) -> Any:
    raise BadFormat(f"payload: floats are not allowed ({text})")


def _no_constants(text: str) -> Any:
    raise BadFormat(f"payload: {text} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadFormat(f"payload: duplicate key {key!r}")
            seen.add(key)
    return out


#: Limits of what :func:`loads_object` reads at all.
MAX_BYTES = 1024 * 1024
MAX_DEPTH = 16
MAX_INT_DIGITS = 20                # 2^64 has 20 digits; every bound of a field is far below
_ESCAPE = re.compile(rb"\\.", re.S)
#: A number of more than MAX_INT_DIGITS digits, or what looks like one inside a string: only
#: then is every integer read through :func:`_bounded_int`.
_LONG_NUMBER = re.compile(rb"[:,\[]\s*-?[0-9]{%d}" % (MAX_INT_DIGITS + 1))
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings do not
    count). Cheap: escapes are dropped, what lies between every other quote (the strings) is
    dropped, and only the brackets left are looped over."""
    outside = b"".join(_ESCAPE.sub(b"", data).split(b'"')[0::2])
    brackets = outside.translate(None, _NOT_BRACKETS)
    level = deepest = 0
    for b in brackets:
        if b in (0x5B, 0x7B):
            level += 1
            if level > deepest:
                deepest = level
        else:
            level -= 1
    return deepest


def _bounded_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INT_DIGITS:
        raise BadFormat(f"payload: an integer of {len(digits)} digits")
    return int(text)


#: Both refuse floats, NaN and duplicate keys; the first bounds every integer's digits, the second
#: leaves integers to the C scanner, for texts with no run of digits that could be too long.
_STRICT = json.JSONDecoder(parse_float=_no_floats, parse_int=_bounded_int, parse_constant=_no_constants,
                           object_pairs_hook=_unique_keys)
_SHORT_INTS = json.JSONDecoder(parse_float=_no_floats, parse_constant=_no_constants,
                               object_pairs_hook=_unique_keys)


def loads_object(data: bytes, what: str = "payload", *, max_bytes: int = MAX_BYTES,
                 max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Decode a JSON object strictly: UTF-8, no floats, no NaN, no duplicate keys; at most
    ``max_bytes`` long, ``max_depth`` deep, and integers of at most 20 digits."""
    if len(data) > max_bytes:
        raise BadFormat(f"{what}: larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadFormat(f"{what}: not UTF-8 ({exc.reason})") from None
    # Nested no deeper than it has brackets: most inputs are cleared by two counts.
    if data.count(b"[") + data.count(b"{") > max_depth and depth(data) > max_depth:
        raise BadFormat(f"{what}: nested deeper than {max_depth} levels")
    try:
        decoder = _STRICT if _LONG_NUMBER.search(data) else _SHORT_INTS
        obj = decoder.decode(text)
    except BadFormat as exc:
        raise BadFormat(f"{what}: {str(exc).removeprefix('payload: ')}") from None
    except json.JSONDecodeError as exc:
        raise BadFormat(f"{what}: not JSON ({exc.msg} at {exc.pos})") from None
    except (ValueError, RecursionError) as exc:     # whatever json itself cannot take
        raise BadFormat(f"{what}: not JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise BadFormat(f"{what}: must be a JSON object")
    return obj


def _names(keys: Set[str]) -> str:
    """Member names for an error message: sorted, at most five, each cut to 40 characters."""
    shown = [repr(k[:40]) for k in sorted(keys)[:5]]
    return ", ".join(shown) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def check_members(obj: Mapping[str, Any], members: Set[str], what: str, hint: str = "") -> None:
    """Raise :class:`BadFormat` unless ``obj`` has exactly ``members``, naming what is extra or
    missing (then ``hint``)."""
    unknown = set(obj) - members
    if unknown:
        raise BadFormat(f"{what}: unknown members {_names(unknown)}{hint}")
    missing = set(members) - set(obj)
    if missing:
        raise BadFormat(f"{what}: missing {_names(missing)}{hint}")
