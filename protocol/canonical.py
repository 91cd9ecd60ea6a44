"""Canonical JSON for signed payloads: sorted keys, no spaces, UTF-8, integers only."""

from __future__ import annotations

import json
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
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadFormat(f"payload: duplicate key {key!r}")
        out[key] = value
    return out


def loads_object(data: bytes, what: str = "payload") -> dict[str, Any]:
    """Decode a JSON object strictly: UTF-8, no floats, no NaN, no duplicate keys."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadFormat(f"{what}: not UTF-8 ({exc.reason})") from None
    try:
        obj = json.loads(
            text,
            parse_float=_no_floats,
            parse_constant=_no_constants,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise BadFormat(f"{what}: not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(obj, dict):
        raise BadFormat(f"{what}: must be a JSON object")
    return obj
