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
    api_token_file = "/etc/odoledger/api-token"   # or api_token = "…"; fleet_token(_file) alike
    silent_hours = 24                   # webhooks (backend.notify.config): [[webhook]] tables
    display_unit = "mi"                 # the fleet's default unit on pages and in exports (km)

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
from backend.notify.config import (
    DEFAULT_GRACE_HOURS,
    DEFAULT_SILENT_HOURS,
    GRACE_HOURS_RANGE,
    SILENT_HOURS_RANGE,
    NotifyConfig,
    parse_webhooks,
)
from backend.records.evidence import DEFAULT_LIMITS, EvidenceLimits
from backend.web.doors import check_origin, is_loopback
from common.transport import BrokerConfig, parse_broker_url, parse_listen
from common.units import check_unit

#: How much refused content is kept (:class:`backend.records.evidence.EvidenceLimits`), by key.
EVIDENCE_KEYS = {"evidence_per_device": "per_device", "evidence_per_device_bytes": "per_device_bytes",
                 "evidence_unknown": "unknown", "evidence_unknown_bytes": "unknown_bytes"}

#: Keys the config file may hold (besides the options of the command being run).
KEYS = frozenset({
    "db", "broker", "http", "rules", "fleet_token", "api_token", "tls_ca", "tls_cert", "tls_key",
    "client_id", "session_expiry", "log_level", "secure_cookies", "log_origin", "witness", "workers",
    "worker_processes",
    "display_unit", "webhook", "silent_hours", "confirmation_grace_hours",
    "api_token_file", "fleet_token_file", "metrics_token", "metrics_token_file", "metrics_listen",
    "allowed_origin",
    *EVIDENCE_KEYS,
})
_INT_KEYS = frozenset({"session_expiry", "workers", "silent_hours", "confirmation_grace_hours",
                       *EVIDENCE_KEYS})
_TABLE_KEYS = frozenset({"webhook"})      # an array of TOML tables, in the config file only
_BOOL_KEYS = frozenset({"secure_cookies", "worker_processes"})
_LIST_KEYS = frozenset({"witness", "allowed_origin"})   # a list of strings (a flag again, or a TOML array)
#: At most this many witnesses, each an http(s) URL of at most 500 characters.
MAX_WITNESSES = 16
_WITNESS_URL = re.compile(r"https?://[A-Za-z0-9.\[\]:-]{1,255}(/[\x21-\x7e]{0,240})?")
_NOT_SETTINGS = frozenset({"config", "command", "func", "json"})
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
DEFAULT_SESSION_EXPIRY_S = 300
#: The largest config file read (a few dozen keys, a few webhooks).
MAX_CONFIG_BYTES = 1024 * 1024
#: The largest secret file read (``api_token_file`` …); a token is one line.
MAX_SECRET_BYTES = 4096
#: The secrets a file may hold instead of the setting itself, by setting.
SECRET_FILES = {"api_token": "api_token_file", "fleet_token": "fleet_token_file",
                "metrics_token": "metrics_token_file"}
_BEARER_SECRETS = frozenset({"api_token", "metrics_token"})
MAX_ALLOWED_ORIGINS = 16
#: How the backend's processes write their log (to stderr: the journal, under systemd).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
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
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError("--config", f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"{path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path}: not valid TOML ({exc})") from None
    except (ValueError, RecursionError) as exc:        # what tomllib itself cannot take
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError("--config", f"{path}: not valid TOML ({why})") from None
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
        elif key in _TABLE_KEYS:
            ok = isinstance(value, list) and all(isinstance(v, dict) for v in value)
            kind = f"an array of tables ([[{key}]])"
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
    if key in _TABLE_KEYS:
        raise ConfigError(f"ODO_{key.upper()}", f"is set only in the --config file, as [[{key}]] tables")
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
    except (DatabaseError, ValueError) as exc:      # ValueError: a URL that urllib cannot split
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


def display_unit(s: Settings) -> str:
    """The fleet's default unit of distance (``display_unit``: km or mi; km when unset); a device
    may have its own (``odo-backend devices unit``)."""
    value = s.get("display_unit")
    if value is None:
        return "km"
    try:
        return check_unit(value)
    except ValueError as exc:
        raise s.error("display_unit", str(exc)) from None


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
    rules_path: Path | None             # None: the rule book already published in the database
    fleet_token: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    secure_cookies: bool = False
    evidence: EvidenceLimits = DEFAULT_LIMITS
    witnesses: tuple[str, ...] = ()
    log_origin: str | None = None
    workers: int | None = None          # ingest worker threads; None: after the CPU count
    worker_processes: bool = True       # each worker's batches verified and stored in a process of its own
    display_unit: str = "km"            # the fleet's default unit of distance: km | mi
    notify: NotifyConfig = NotifyConfig()   # the webhooks, and when an event is raised
    insecure_no_auth: bool = False      # serve the API open when it has no credential, on purpose
    metrics_token: str | None = field(default=None, repr=False)
    metrics_listen: tuple[str, int] | None = None   # /metrics on a listener of its own
    allowed_origins: tuple[str, ...] = ()           # besides the server's own (backend.web.doors)

    @property
    def http_loopback(self) -> bool:
        return is_loopback(self.http_host)


def secret(s: Settings, key: str) -> str | None:
    """The secret ``key`` (``api_token`` …), given itself or as the file ``<key>_file`` that holds
    it (one line; mode 0600 or 0640 advised), never both. A bearer token (``api_token``,
    ``metrics_token``) is printable ASCII without spaces, as an ``Authorization`` header carries it."""
    file_key = SECRET_FILES[key]
    value, path = s.get(key), s.get(file_key)
    if value is not None and path is not None:
        raise s.error(file_key, f"{key} is given too ({s.source(key)}): give one of the two")
    where, named = (file_key, f"{path}: the token") if path is not None else (key, "the token")
    if path is not None:
        try:
            with open(str(path), "rb") as fh:
                raw = fh.read(MAX_SECRET_BYTES + 1)
                mode = os.fstat(fh.fileno()).st_mode
        except OSError as exc:
            raise s.error(file_key, f"{path}: cannot read it ({exc.strerror or exc})") from None
        if len(raw) > MAX_SECRET_BYTES:
            raise s.error(file_key, f"{path}: larger than {MAX_SECRET_BYTES} bytes; it holds one token")
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise s.error(file_key, f"{path}: not UTF-8 text") from None
        if not value:
            raise s.error(file_key, f"{path}: is empty")
        if mode & 0o007:
            log.warning("%s %s can be read by every user of this machine: chmod 0600 (or 0640)",
                        file_key, path)
    if value is None:
        return None
    value = str(value)
    if not value.strip():
        raise s.error(key, "must not be empty")
    if key in _BEARER_SECRETS and not re.fullmatch(r"[\x21-\x7e]{1,1024}", value):
        raise s.error(where, f"{named} must be 1 to 1024 printable ASCII characters without spaces")
    if "\n" in value or len(value) > MAX_SECRET_BYTES:
        raise s.error(where, f"{named} is one line of at most {MAX_SECRET_BYTES} bytes")
    if len(value) < 16:
        log.warning("%s is shorter than 16 characters: easy to guess; use a long random one", key)
    return value


def _insecure_no_auth(s: Settings) -> bool:
    if s.get("insecure_no_auth") is None:
        return False
    if s.source("insecure_no_auth") != "flag":
        raise s.error("insecure_no_auth", "is taken only as the command-line flag --insecure-no-auth")
    return bool(s.get("insecure_no_auth"))


def _secure_cookies(s: Settings, http_host: str) -> bool:
    """``secure_cookies`` as set, else True unless ``http`` is a loopback address."""
    value = s.get("secure_cookies")
    if value is None:
        return not is_loopback(http_host)
    if not value and not is_loopback(http_host):
        log.warning("secure_cookies is false and --http %s is not loopback: session cookies go over plain "
                    "HTTP to anyone who can watch the network", http_host)
    return bool(value)


def _metrics_listen(s: Settings, http: tuple[str, int]) -> tuple[str, int] | None:
    value = s.get("metrics_listen")
    if value is None:
        return None
    try:
        listen = parse_listen(str(value))
    except ValueError as exc:
        raise s.error("metrics_listen", str(exc)) from None
    if listen[1] == http[1] and (listen[0] == http[0] or "0.0.0.0" in (listen[0], http[0])
                                 or "::" in (listen[0], http[0])):
        raise s.error("metrics_listen", f"{value}: the same port as --http; give /metrics a port of its own")
    return listen


def allowed_origins(s: Settings) -> tuple[str, ...]:
    """The ``allowed_origin`` values, validated (:func:`backend.web.doors.check_origin`)."""
    value = s.get("allowed_origin")
    origins = [] if value is None else [value] if isinstance(value, str) else list(value)
    if len(origins) > MAX_ALLOWED_ORIGINS:
        raise s.error("allowed_origin", f"{len(origins)} origins: at most {MAX_ALLOWED_ORIGINS}")
    for origin in origins:
        try:
            check_origin(str(origin))
        except ValueError as exc:
            raise s.error("allowed_origin", str(exc)) from None
    return tuple(str(o) for o in origins)


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
    rules_value = s.get("rules")
    rules = None if rules_value is None else Path(str(rules_value))
    api_token, fleet_token, metrics_token = (secret(s, key) for key in SECRET_FILES)
    return RunConfig(
        db=db,
        broker=BrokerConfig(url.host, url.port, url.tls, url.username, url.password, tls_ca=ca, tls_cert=cert,
                            tls_key=key, client_id=client_id, session_expiry_s=expiry),
        http_host=http_host, http_port=http_port, rules_path=rules,
        fleet_token=fleet_token, api_token=api_token,
        secure_cookies=_secure_cookies(s, http_host),
        evidence=_evidence_limits(s),
        witnesses=witness_urls(s),
        log_origin=_log_origin(s),
        workers=_workers(s),
        worker_processes=s.get("worker_processes") is not False,
        display_unit=display_unit(s),
        notify=notify_config(s),
        insecure_no_auth=_insecure_no_auth(s),
        metrics_token=metrics_token,
        metrics_listen=_metrics_listen(s, (http_host, http_port)),
        allowed_origins=allowed_origins(s),
    )


def notify_config(s: Settings) -> NotifyConfig:
    """The ``[[webhook]]`` tables, ``silent_hours`` and ``confirmation_grace_hours``, validated."""
    hours = []
    for key, default, (low, high) in (("silent_hours", DEFAULT_SILENT_HOURS, SILENT_HOURS_RANGE),
                                      ("confirmation_grace_hours", DEFAULT_GRACE_HOURS, GRACE_HOURS_RANGE)):
        value = s.get(key)
        if value is None:
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise s.error(key, f"{value!r}: must be an integer from {low} to {high} hours")
        hours.append(value)
    where = f"{s.path}: webhook" if s.path is not None else "webhook"
    return NotifyConfig(parse_webhooks(s.get("webhook"), where), hours[0], hours[1])


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
