"""The webhook settings of the config file: an array of tables, one per receiver::

    silent_hours = 24                 # device_silent: no message from an approved device for this long
    confirmation_grace_hours = 24     # week_unconfirmed: this long after the ISO week ends

    [[webhook]]
    url = "https://fleet.example.com/hooks/odoledger"
    secret_file = "/etc/odoledger/webhook-fleet.secret"    # or secret = "…" (16 to 1024 bytes)
    events = ["device_silent", "week_unconfirmed", "rollback"]   # default: all six

A wrong table is a :class:`ConfigError` naming the field, e.g. ``webhook[2].events``.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import ConfigError

#: The events a webhook may subscribe to (docs/DESIGN.md §8).
EVENTS = ("device_silent", "week_unconfirmed", "fork", "rollback", "vin_change", "redemption")
MAX_WEBHOOKS = 16
MAX_URL_CHARS = 1000
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 1024
FIELDS = frozenset({"url", "secret", "secret_file", "events"})
DEFAULT_SILENT_HOURS = 24
DEFAULT_GRACE_HOURS = 24
#: ``silent_hours`` from 1 h to a year; ``confirmation_grace_hours`` from 0 to 30 days.
SILENT_HOURS_RANGE = (1, 8760)
GRACE_HOURS_RANGE = (0, 720)

_PRINTABLE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Webhook:
    url: str
    secret: bytes = field(repr=False)
    events: frozenset[str] = frozenset(EVENTS)


@dataclass(frozen=True)
class NotifyConfig:
    webhooks: tuple[Webhook, ...] = ()
    silent_hours: int = DEFAULT_SILENT_HOURS
    confirmation_grace_hours: int = DEFAULT_GRACE_HOURS

    def wanted(self) -> frozenset[str]:
        """The events some webhook subscribes to."""
        return frozenset(e for w in self.webhooks for e in w.events)


def check_url(url: object) -> str:
    """An http:// or https:// URL of at most :data:`MAX_URL_CHARS` printable characters, with a
    host, and neither a user name nor a fragment; ValueError saying what is wrong."""
    if not isinstance(url, str):
        raise ValueError(f"must be a string, got {url!r}")
    if not 0 < len(url) <= MAX_URL_CHARS or not _PRINTABLE.fullmatch(url):
        raise ValueError(f"must be 1 to {MAX_URL_CHARS} printable characters without spaces")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname or port == 0:
        raise ValueError(f"{url!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: no user name or password in the URL (the secret signs each request)")
    if parts.fragment:
        raise ValueError(f"{url!r}: no #fragment")
    return url


def _secret(table: dict[str, object], name: str) -> bytes:
    if ("secret" in table) == ("secret_file" in table):
        raise ConfigError(f"{name}.secret", "give one of secret or secret_file")
    if "secret" in table:
        value = table["secret"]
        if not isinstance(value, str):
            raise ConfigError(f"{name}.secret", f"must be a string, got {type(value).__name__}")
        secret, what = value.encode("utf-8"), f"{name}.secret"
    else:
        path = table["secret_file"]
        what = f"{name}.secret_file"
        if not isinstance(path, str) or not path:
            raise ConfigError(what, f"must be a file name, got {path!r}")
        try:
            with open(Path(path), "rb") as f:
                secret = f.read(MAX_SECRET_BYTES + 2).strip()
        except OSError as exc:
            raise ConfigError(what, f"{path}: cannot read it ({exc.strerror})") from None
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise ConfigError(what, f"the secret must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, "
                                f"got {len(secret)}")
    return secret


def _events(table: dict[str, object], name: str) -> frozenset[str]:
    if "events" not in table:
        return frozenset(EVENTS)
    value = table["events"]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}.events", f"must be a non-empty list of event names, got {value!r}")
    for event in value:
        if event not in EVENTS:
            raise ConfigError(f"{name}.events", f"unknown event {event!r} (known: {', '.join(EVENTS)})")
    if len(set(value)) != len(value):
        raise ConfigError(f"{name}.events", "an event is given twice")
    return frozenset(value)


def parse_webhooks(tables: object, where: str) -> tuple[Webhook, ...]:
    """The ``[[webhook]]`` tables, validated; ``where`` (``FILE: webhook``) prefixes each error's key."""
    if tables is None:
        return ()
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(where, "must be an array of tables ([[webhook]])")
    if len(tables) > MAX_WEBHOOKS:
        raise ConfigError(where, f"{len(tables)} webhooks: at most {MAX_WEBHOOKS}")
    hooks: list[Webhook] = []
    for n, table in enumerate(tables, start=1):
        name = f"{where}[{n}]"
        for key in table:
            if key not in FIELDS:
                raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(FIELDS))})")
        if "url" not in table:
            raise ConfigError(f"{name}.url", "is required")
        try:
            url = check_url(table["url"])
        except ValueError as exc:
            raise ConfigError(f"{name}.url", str(exc)) from None
        if any(h.url == url for h in hooks):
            raise ConfigError(f"{name}.url", f"{url!r} is given twice")
        hooks.append(Webhook(url, _secret(table, name), _events(table, name)))
    return tuple(hooks)
