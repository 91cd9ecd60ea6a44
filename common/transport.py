"""How to reach the MQTT broker and where to listen (docs/DESIGN.md §7), parsed the same way by the
agent and the backend.

``--broker`` is ``mqtt://[user:password@]host[:port]`` or ``mqtts://…`` (port 1883 or 8883 by
default); a listen address is ``HOST:PORT`` (``[::1]:8080`` for IPv6). Parsing is pure: a bad
value is a :class:`ValueError` whose message names what was wrong.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

MQTT_PORT = 1883
MQTTS_PORT = 8883


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to reach the MQTT broker; the TLS files are checked by whoever loads them."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    mqtt_version: str = "5"
    keepalive_s: int = 30
    client_id: str | None = None
    session_expiry_s: int = 300

    @property
    def display(self) -> str:
        """The URL without its password, for messages and logs."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class BrokerURL:
    """The parts of a ``--broker`` URL."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None = field(repr=False)


def parse_broker_url(url: str) -> BrokerURL:
    """``mqtt[s]://[user:password@]host[:port]``; raise ValueError naming the fault."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{url!r}: use mqtt://host:port or mqtts://host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: only [user:password@]host:port may follow the scheme")
    tls = parts.scheme == "mqtts"
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return BrokerURL(parts.hostname, port or (MQTTS_PORT if tls else MQTT_PORT), tls, user, password)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) → (host, port); raise ValueError naming the fault."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)
