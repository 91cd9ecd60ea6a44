"""The agent's configuration: a TOML file, ``ODO_*`` environment variables and flags.

Flags win over the environment, which wins over the file. Everything is read
once at start and validated into frozen dataclasses (the broker's is
:class:`common.transport.BrokerConfig`, shared with the backend); secrets (the fleet token,
the broker password) never show in ``repr``. A bad value raises
:class:`ConfigError` naming the key and where it came from: the CLI exits 2 for
a bad flag and 78 (``EX_CONFIG``, which systemd is told not to restart on) for
a bad file or environment value.

The file (default ``<state_dir>/agent.toml``)::

    obd_port = "/dev/rfcomm0"            # or "socket://192.168.0.10:35000"
    broker = "mqtts://dongle:secret@mqtt.example.org:8883"
    tls_ca = "/etc/odoledger/ca.pem"     # tls_cert / tls_key for client certificates
    fleet_token = "…"
    tolerance_m = 2000
    display_unit = "km"                  # or "mi": what the driver reads and types (the page, confirm)
    clock = "auto"                       # or "synced" / "unsynced" (tests)
    max_records = 50000
    retention_days = 30
    shutdown_command = ["systemctl", "poweroff"]
    ui_listen = "127.0.0.1:8080"         # the driver's page; "0.0.0.0:8080" only on purpose
    ui_interface = "wlan0"               # then on the hotspot's IPv4 address, ui_listen's port

    [vehicle]                            # agent.vehicle.VehicleConfig fields
    record_every_m = 1000

    [power]                              # agent.power.PowerConfig fields
    off_poll_s = 10
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from agent.errors import ConfigError
from common.transport import BrokerConfig, BrokerURL, parse_broker_url, parse_listen
from common.units import UNITS

CONFIG_FILE = "agent.toml"
ENV_PREFIX = "ODO_"
CLOCK_MODES = ("auto", "synced", "unsynced")
MQTT_VERSIONS = ("5", "3.1.1")

#: A week offline while driving around the clock at one record a minute is
#: 7 × 24 × 60 = 10,080 records (plus a trip record or two an hour). 50,000
#: records hold about five such weeks, or most of a year of three hours' driving
#: a day. Measured: an odometer record's JWS is ~560 bytes and a row takes ~810
#: bytes of the SQLite file with its indexes, so the cap is ~40 MB on disk.
DEFAULT_MAX_RECORDS = 50_000


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    obd_port: str | None = None
    obd_baudrate: int | None = None
    broker: BrokerConfig | None = None
    fleet_token: str | None = field(default=None, repr=False)
    tolerance_m: int = 2000
    display_unit: str = "km"
    clock: str = "auto"
    max_records: int = DEFAULT_MAX_RECORDS
    retention_days: int = 30
    shutdown_command: tuple[str, ...] = ()
    ui_listen: str = "127.0.0.1:8080"
    ui_interface: str | None = None
    resend_after_s: float = 10.0
    log_level: str | None = None
    vehicle: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    power: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def db_path(self) -> Path:
        return self.state_dir / "outbox.db"


# -- parsing single values -------------------------------------------------------------------------

#: The largest integer of any setting (seconds, metres, counts: all far below it).
MAX_INT = 2**31 - 1
#: The largest config file read.
MAX_FILE_BYTES = 1024 * 1024


def _int(minimum: int = 0, maximum: int = MAX_INT) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"must be an integer, got {value!r}") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        if value > maximum:
            raise ValueError(f"must be at most {maximum}, got {value}")
        return value
    return parse


def _seconds(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
        raise ValueError(f"must be a number of seconds between 0 and 86400, got {value!r}")
    return float(value)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    text = value.strip()
    if not text.isprintable() and any(c < " " or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in text):
        raise ValueError(f"must be text without control characters or invalid UTF-8, got {value!r}")
    return text


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return str(value)
    return parse


def _command(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError("must be a command line (a string or a list of strings)")


def _listen(value: object) -> str:
    host, port = parse_listen(_text(value))
    return f"{host}:{port}"


def _interface(value: object) -> str:
    name = _text(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", name):
        raise ValueError(f"must be a network interface's name, e.g. wlan0, got {name!r}")
    return name


def _broker_url(text: str) -> BrokerURL:
    """:func:`common.transport.parse_broker_url`, with a password in the URL masked in its message."""
    try:
        return parse_broker_url(text)
    except ValueError as exc:
        message = str(exc)
        try:
            password = urllib.parse.urlsplit(text.strip()).password
        except ValueError:
            password = None
        if password:
            message = message.replace(f":{password}@", ":***@")
        raise ValueError(message) from None


_SIMPLE: dict[str, Callable[[object], Any]] = {
    "obd_port": _text,
    "obd_baudrate": _int(1),
    "broker": _text,
    "tls_ca": _text,
    "tls_cert": _text,
    "tls_key": _text,
    "mqtt_version": _choice(*MQTT_VERSIONS),
    "keepalive_s": _int(5, 65535),
    "fleet_token": _text,
    "tolerance_m": _int(0),
    "display_unit": _choice(*UNITS),
    "clock": _choice(*CLOCK_MODES),
    "max_records": _int(100),
    "retention_days": _int(0),
    "shutdown_command": _command,
    "ui_listen": _listen,
    "ui_interface": _interface,
    "resend_after_s": _seconds,
    "log_level": _choice("debug", "info", "warning", "error"),
}
_TABLES = ("vehicle", "power")
KEYS = ("state_dir", *_SIMPLE, *_TABLES)


# -- loading ---------------------------------------------------------------------------------------

def _read_file(path: Path, source: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError("config", f"{path} is larger than {MAX_FILE_BYTES} bytes", "file")
        return tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("config", f"{path} does not exist", source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{path} is not UTF-8 (byte {exc.start})", "file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML ({exc})", "file") from None
    except (ValueError, RecursionError) as exc:        # what tomllib itself cannot take
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError("config", f"{path} is not valid TOML ({why})", "file") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path} ({exc.strerror})", "file") from None


def load(
    flags: Mapping[str, object],
    env: Mapping[str, str] | None = None,
    *,
    require: Iterable[str] = (),
    missing_source: str = "file",
) -> AgentConfig:
    """Merge file, environment and flags (``None`` flags are ignored) and validate.

    ``require`` names keys that must end up set; a missing one is reported as
    coming from ``missing_source`` ("flag" for commands whose flags are the
    expected place, so the exit status is 2).
    """
    env = os.environ if env is None else env
    given = {k: v for k, v in flags.items() if v is not None}
    env_values = {
        key: env[ENV_PREFIX + key.upper()]
        for key in ("config", "state_dir", *_SIMPLE)
        if env.get(ENV_PREFIX + key.upper())
    }
    # Where the file is: --config, ODO_CONFIG, or <state_dir>/agent.toml.
    file_values: dict[str, Any] = {}
    file_path: Path | None = None
    if "config" in given or "config" in env_values:
        source = "flag" if "config" in given else "env"
        file_path = Path(str(given.get("config") or env_values["config"]))
        file_values = _read_file(file_path, source)
    state_raw, state_source = _pick("state_dir", given, env_values, file_values)
    if state_raw is None:
        raise ConfigError("state_dir", "is required: --state-dir DIR (or ODO_STATE_DIR)", "flag")
    try:
        state_dir = Path(_text(state_raw)).expanduser()
    except ValueError as exc:
        raise ConfigError("state_dir", str(exc), state_source) from None
    if "config" not in given and "config" not in env_values and (state_dir / CONFIG_FILE).exists():
        file_path = state_dir / CONFIG_FILE
        file_values = _read_file(file_path, "file")

    def named(key: str, source: str) -> str:
        """A key as an error names it: with the file's path when the value came from it."""
        return f"{file_path}: {key}" if source == "file" and file_path is not None else key

    unknown = sorted(set(file_values) - set(KEYS))
    if unknown:
        raise ConfigError(named(unknown[0][:100], "file"), f"unknown setting (known: {', '.join(KEYS)})",
                          "file")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, parse in _SIMPLE.items():
        raw, source = _pick(key, given, env_values, file_values)
        if raw is None:
            continue
        try:
            values[key] = parse(raw)
        except ValueError as exc:
            raise ConfigError(named(key, source), str(exc), source) from None
        sources[key] = source
    for table in _TABLES:
        raw = file_values.get(table, {})
        if not isinstance(raw, dict):
            raise ConfigError(named(table, "file"), "must be a table", "file")
        values[table] = MappingProxyType(dict(raw))

    for key in require:
        if key not in values:
            hint = f"--{key.replace('_', '-')}" if missing_source == "flag" else f"set {key}"
            raise ConfigError(key, f"is required ({hint}, or {ENV_PREFIX}{key.upper()})", missing_source)

    broker = None
    if "broker" in values:
        try:
            url = _broker_url(values.pop("broker"))
        except ValueError as exc:
            raise ConfigError(named("broker", sources["broker"]), str(exc), sources["broker"]) from None
        tls_files = {
            k: Path(values.pop(k)).expanduser() for k in ("tls_ca", "tls_cert", "tls_key") if k in values
        }
        if tls_files and not url.tls:
            key = next(iter(tls_files))
            raise ConfigError(named(key, sources[key]), "TLS files need an mqtts:// broker URL", sources[key])
        if ("tls_cert" in tls_files) != ("tls_key" in tls_files):
            key = "tls_key" if "tls_cert" in tls_files else "tls_cert"
            source = sources.get(key, "file")
            raise ConfigError(named(key, source), "tls_cert and tls_key go together", source)
        for key, path in tls_files.items():
            if not path.is_file():
                raise ConfigError(named(key, sources[key]), f"{path} is not a readable file", sources[key])
        broker = BrokerConfig(
            host=url.host, port=url.port, tls=url.tls, username=url.username, password=url.password,
            tls_ca=tls_files.get("tls_ca"), tls_cert=tls_files.get("tls_cert"),
            tls_key=tls_files.get("tls_key"),
            mqtt_version=values.pop("mqtt_version", "5"), keepalive_s=values.pop("keepalive_s", 30),
        )
    else:
        for key in ("tls_ca", "tls_cert", "tls_key", "mqtt_version", "keepalive_s"):
            values.pop(key, None)
    return AgentConfig(state_dir=state_dir, broker=broker, **values)


def _pick(
    key: str, given: Mapping[str, object], env: Mapping[str, str], file: Mapping[str, Any]
) -> tuple[object, str]:
    if key in given:
        return given[key], "flag"
    if key in env:
        return env[key], "env"
    if key in file:
        return file[key], "file"
    return None, ""


def build_table(cfg_cls: type[Any], table: str, values: Mapping[str, Any]) -> Any:
    """Build a frozen config dataclass (``VehicleConfig``, ``PowerConfig``) from a
    ``[table]`` of the file, naming the bad key (``power.off_poll_s``) on error."""
    known = {f.name: f for f in dataclasses.fields(cfg_cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{table}.{key}", f"unknown setting (known: {', '.join(known)})")
        default = known[key].default
        if isinstance(default, bool) != isinstance(value, bool):
            raise ConfigError(f"{table}.{key}", f"must be true or false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
            raise ConfigError(f"{table}.{key}", f"must be an integer, got {value!r}")
        if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{table}.{key}", f"must be a number, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{table}.{key}", f"must not be negative, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value <= MAX_INT:
            raise ConfigError(f"{table}.{key}", f"must be a finite number up to {MAX_INT}, got {value!r}")
    try:
        return cfg_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(table, str(exc)) from None


def _toml_string(text: str) -> str:
    """A TOML basic string of ``text``: each character as itself (the file is UTF-8) but the
    quote, the backslash and the control characters, escaped. (Not a JSON string: JSON writes a
    character beyond the BMP, an emoji, as a surrogate pair of escapes, which TOML refuses.)"""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        elif "\ud800" <= c <= "\udfff":
            raise ValueError(f"cannot write {text!r} to TOML: not valid Unicode")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"cannot write {value!r} to TOML")


def write_file(path: Path, values: Mapping[str, object]) -> None:
    """Write a fresh config file (mode 0600: it may hold the broker password)."""
    lines = ["# odo-agent configuration; see `odo-agent --help`. Flags and ODO_* variables override it."]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
