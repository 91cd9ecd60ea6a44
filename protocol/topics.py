"""MQTT topic names (docs/protocol.md §4.1)."""

from __future__ import annotations

from protocol.errors import BadFormat
from protocol.identity import DEV_RE

PREFIX = "odo/v1"
CHANNELS = ("records", "ack", "status", "enroll", "enrolled", "claim")
SHARE_GROUP = "odo-backend"


def topic(dev: str, channel: str) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    return f"{PREFIX}/{dev}/{channel}"


def records(dev: str) -> str:
    return topic(dev, "records")


def ack(dev: str) -> str:
    return topic(dev, "ack")


def status(dev: str) -> str:
    return topic(dev, "status")


def enroll(dev: str) -> str:
    return topic(dev, "enroll")


def enrolled(dev: str) -> str:
    return topic(dev, "enrolled")


def claim(dev: str) -> str:
    return topic(dev, "claim")


def shared(channel: str) -> str:
    """The backend's shared subscription for one channel of every device."""
    return f"$share/{SHARE_GROUP}/{PREFIX}/+/{channel}"


def parse(name: str) -> tuple[str, str]:
    """Split ``odo/v1/<dev>/<channel>`` into ``(dev, channel)``."""
    parts = name.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != PREFIX:
        raise BadFormat(f"topic {name!r}: not under {PREFIX}/<dev>/")
    dev, channel = parts[2], parts[3]
    if not DEV_RE.fullmatch(dev):
        raise BadFormat(f"topic {name!r}: {dev!r} is not a device id")
    if channel not in CHANNELS:
        raise BadFormat(f"topic {name!r}: unknown channel {channel!r}")
    return dev, channel
