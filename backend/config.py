"""Settings of the ``odo-backend`` commands, read once at start.

Each option comes from, in this order of precedence: its command-line flag, an ``ODO_<KEY>``
environment variable (``ODO_DB``, ``ODO_BROKER``, ``ODO_FLEET_TOKEN`` …), or the TOML file named
by ``--config`` (or ``ODO_CONFIG``), whose top-level keys are the flags' names with underscores::

    db = "postgresql://odo@db.example/odo"
    broker = "mqtts://backend:secret@mqtt.example:8883"
    tls_ca = "/etc/odoledger/ca.pem"
    http = "127.0.0.1:8080"
    rules = "/etc/odoledger/rules.toml"
    log_origin = "odoledger.example.net/log"
    witness = ["https://witness.example.org"]

A wrong value is a :class:`ConfigError` that names the key: exit status 2 when it came from a
flag (a usage error), 78 (``EX_CONFIG``) when it came from the file or the environment, so that
systemd does not restart a service whose configuration cannot work.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.db import Database
from backend.errors import EX_USAGE, ConfigError, DatabaseError, TranslogError, UsageError
from backend.records.evidence import DEFAULT_LIMITS, EvidenceLimits
from common.transport import BrokerConfig, parse_broker_url, parse_listen

#: How much refused content is kept (:class:`backend.records.evidence.EvidenceLimits`), by key.
EVIDENCE_KEYS = {"evidence_per_device": "per_device", "evidence_per_device_bytes": "per_device_bytes",
                 "evidence_unknown": "unknown", "evidence_unknown_bytes": "unknown_bytes"}

#: Keys the config file may hold (besides the options of the command being run).
KEYS = frozenset({
    "db", "broker", "http", "rules", "fleet_token", "api_token", "tls_ca", "tls_cert", "tls_key",
    "client_id", "session_expiry", "log_level", "secure_cookies", "log_origin", "witness", "workers",
    *EVIDENCE_KEYS,
})
_INT_KEYS = frozenset({"session_expiry", "workers", *EVIDENCE_KEYS})
_BOOL_KEYS = frozenset({"secure_cookies"})
_LIST_KEYS = frozenset({"witness"})          # a list of strings (a flag given again, or a TOML array)
#: At most this many witnesses, each an http(s) URL of at most 500 characters.
MAX_WITNESSES = 16
_WITNESS_URL = re.compile(r"https?://[A-Za-z0-9.\[\]:-]{1,255}(/[\x21-\x7e]{0,240})?")
_NOT_SETTINGS = frozenset({"config", "command", "func", "json"})
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
DEFAULT_SESSION_EXPIRY_S = 300
#: At most this many ingest workers (``workers``); the default is two to four, after the CPU count.
MAX_WORKERS = 32

log = logging.getLogger(__name__)


def parse_time(text: str, what: str) -> int:
    """ISO 8601 (``2026-11-02``, ``2026-11-02T08:00``, ``…Z``, ``…+01:00``; UTC when no zone) to
    Unix ms; ``what`` names the option in the error."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{what}: {text!r} is not an ISO 8601 date or time (e.g. 2026-11-02T08:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file with default settings (also ODO_CONFIG)")


class Settings:
    """The merged values of one command, each with where it came from."""

    def __init__(self, values: Mapping[str, tuple[Any, str]], path: Path | None) -> None:
        self._values = dict(values)
        self.path = path

    def get(self, key: str) -> Any:
        found = self._values.get(key)
        return None if found is None else found[0]

    def source(self, key: str) -> str:
        found = self._values.get(key)
        return "missing" if found is None else found[1]

    def error(self, key: str, message: str) -> ConfigError:
        """An error about ``key``, worded for where its value came from."""
        where = self.source(key)
        if where == "flag":
            return ConfigError(f"--{key.replace('_', '-')}", message, EX_USAGE)
        if where == "env":
            return ConfigError(f"ODO_{key.upper()}", message)
        if where == "file":
            return ConfigError(f"{self.path}: {key}", message)
        flag = f"--{key.replace('_', '-')}"
        if self.path is not None:
            return ConfigError(f"{self.path}: {key}", f"{message} (set it there, or pass {flag})")
        return ConfigError(flag, f"{message} (or set ODO_{key.upper()}, or {key} in --config FILE)",
                           EX_USAGE)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None or value == "":
            raise self.error(key, "is required")
        return value


def _read_file(path: Path, allowed: frozenset[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"{path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path}: not valid TOML ({exc})") from None
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{path}: {key}", f"unknown key (known: {', '.join(sorted(allowed))})")
        if key in _INT_KEYS:
            ok = isinstance(value, int) and not isinstance(value, bool)
            kind = "an integer"
        elif key in _BOOL_KEYS:
            ok, kind = isinstance(value, bool), "true or false"
        elif key in _LIST_KEYS:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            kind = "a list of strings"
        else:
            ok, kind = isinstance(value, str), "a string"
        if not ok:
            raise ConfigError(f"{path}: {key}", f"must be {kind}, got {value!r}")
    return data


def settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Merge the flags of ``args`` with ``ODO_*`` variables and the ``--config`` file."""
    env = os.environ if environ is None else environ
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    allowed = KEYS | frozenset(flags)
    config = getattr(args, "config", None) or env.get("ODO_CONFIG") or None
    path = Path(config) if config else None
    from_file = _read_file(path, allowed) if path is not None else {}
    values: dict[str, tuple[Any, str]] = {}
    for key in allowed:
        if flags.get(key) is not None and flags[key] is not False:   # False: a switch not given
            values[key] = (flags[key], "flag")
        elif env.get(f"ODO_{key.upper()}", "") != "":
            text = env[f"ODO_{key.upper()}"]
            values[key] = (_from_env(key, text), "env")
        elif key in from_file:
            values[key] = (from_file[key], "file")
    return Settings(values, path)


def _from_env(key: str, text: str) -> Any:
    if key in _INT_KEYS:
        if not text.strip().isdigit():
            raise ConfigError(f"ODO_{key.upper()}", f"must be an integer, got {text!r}")
        return int(text)
    if key in _LIST_KEYS:
        return [v for v in re.split(r"[\s,]+", text) if v]
    if key in _BOOL_KEYS:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"ODO_{key.upper()}", f"must be true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    return text


def open_database(s: Settings) -> Database:
    """Open ``db`` (without connecting); a bad URL is a :class:`ConfigError` naming the setting."""
    url = s.require("db")
    try:
        return Database.open(str(url))
    except DatabaseError as exc:
        raise s.error("db", str(exc)) from None


def migrated_database(s: Settings) -> Database:
    """Open ``db`` and bring its schema up to date, and check ``log_origin`` against the log's.
    A bad URL or origin is a :class:`ConfigError`; a database that cannot be reached or migrated
    stays a :class:`DatabaseError` (exit status 1)."""
    from backend.transparency import translog

    db = open_database(s)
    try:
        db.migrate()
        wanted = s.get("log_origin")
        if wanted is not None:
            try:
                translog.origin(db, str(wanted))
            except (ValueError, TranslogError) as exc:
                raise s.error("log_origin", str(exc)) from None
    except BaseException:
        db.close()
        raise
    return db


def witness_urls(s: Settings) -> tuple[str, ...]:
    """The witnesses to push checkpoints to (``witness``), validated."""
    value = s.get("witness")
    urls = [] if value is None else [value] if isinstance(value, str) else list(value)
    if len(urls) > MAX_WITNESSES:
        raise s.error("witness", f"{len(urls)} witnesses: at most {MAX_WITNESSES}")
    for url in urls:
        if not isinstance(url, str) or not _WITNESS_URL.fullmatch(url):
            raise s.error("witness", f"{url!r} is not an http:// or https:// URL of a witness")
    if len(set(urls)) != len(urls):
        raise s.error("witness", "a witness is given twice")
    return tuple(urls)


# -- the daemon's settings -------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    db: Database = field(repr=False)
    broker: BrokerConfig
    http_host: str
    http_port: int
    rules_path: Path
    fleet_token: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    secure_cookies: bool = False
    evidence: EvidenceLimits = DEFAULT_LIMITS
    witnesses: tuple[str, ...] = ()
    log_origin: str | None = None
    workers: int | None = None          # ingest worker threads; None: after the CPU count


def _existing_file(s: Settings, key: str) -> Path | None:
    value = s.get(key)
    if value is None:
        return None
    path = Path(str(value))
    if not path.is_file():
        raise s.error(key, f"{path}: no such file")
    return path


def default_client_id() -> str:
    """Stable across restarts of one host's backend, so that its MQTT session is resumed."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:100] or "host"
    return f"odo-backend-{host}"


def run_config(s: Settings) -> RunConfig:
    """Validate the settings of ``odo-backend run``."""
    db = open_database(s)
    try:
        url = parse_broker_url(str(s.require("broker")))
    except ValueError as exc:
        raise s.error("broker", str(exc)) from None
    ca, cert, key = (_existing_file(s, k) for k in ("tls_ca", "tls_cert", "tls_key"))
    if not url.tls:
        for name, value in (("tls_ca", ca), ("tls_cert", cert), ("tls_key", key)):
            if value is not None:
                raise s.error(name, "is set, but --broker is not mqtts://")
    if (cert is None) != (key is None):
        raise s.error("tls_cert" if cert is None else "tls_key", "tls_cert and tls_key go together")
    client_id = str(s.get("client_id") or default_client_id())
    if not _CLIENT_ID.fullmatch(client_id):
        raise s.error("client_id", f"{client_id!r}: use 1-128 letters, digits, '_', '.', ':' or '-'")
    expiry = s.get("session_expiry")
    expiry = DEFAULT_SESSION_EXPIRY_S if expiry is None else int(expiry)
    if not 0 <= expiry <= 7 * 86400:
        raise s.error("session_expiry", f"{expiry}: must be 0 to 604800 seconds")
    try:
        http_host, http_port = parse_listen(str(s.require("http")))
    except ValueError as exc:
        raise s.error("http", str(exc)) from None
    rules = Path(str(s.require("rules")))
    for name in ("fleet_token", "api_token"):
        value = s.get(name)
        if value is not None and not str(value).strip():
            raise s.error(name, "must not be empty")
        if value is not None and len(str(value)) < 16:
            log.warning("%s is shorter than 16 characters: easy to guess; use a long random one", name)
    return RunConfig(
        db=db,
        broker=BrokerConfig(url.host, url.port, url.tls, url.username, url.password, tls_ca=ca, tls_cert=cert,
                            tls_key=key, client_id=client_id, session_expiry_s=expiry),
        http_host=http_host, http_port=http_port, rules_path=rules,
        fleet_token=s.get("fleet_token") or None, api_token=s.get("api_token") or None,
        secure_cookies=bool(s.get("secure_cookies")),
        evidence=_evidence_limits(s),
        witnesses=witness_urls(s),
        log_origin=_log_origin(s),
        workers=_workers(s),
    )


def _workers(s: Settings) -> int | None:
    value = s.get("workers")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WORKERS:
        raise s.error("workers", f"{value!r}: must be an integer from 1 to {MAX_WORKERS}")
    return value


def _log_origin(s: Settings) -> str | None:
    from backend.transparency import translog

    value = s.get("log_origin")
    if value is None:
        return None
    try:
        return translog.check_origin(str(value))
    except ValueError as exc:
        raise s.error("log_origin", str(exc)) from None


def _evidence_limits(s: Settings) -> EvidenceLimits:
    values = {}
    for key, name in EVIDENCE_KEYS.items():
        value = s.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**40:
            raise s.error(key, f"{value!r}: must be an integer from 0 to 2^40")
        values[name] = value
    return dataclasses.replace(DEFAULT_LIMITS, **values)
