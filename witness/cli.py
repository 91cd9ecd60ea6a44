"""``odo-witness``: run a witness of transparency logs, or print its verifier key::

    odo-witness serve --listen HOST:PORT --state FILE --log-key FILE [--log-key FILE ...] [--name NAME]
    odo-witness key --state FILE --out FILE [--name NAME]

``--state`` is the SQLite state file: the witness's Ed25519 key and name, made on first use, and
the last checkpoint cosigned for each log. ``--log-key`` is a log's verifier key
(``<origin>+<key ID>+<key>``, c2sp.org/signed-note, as ``odo-backend log-key`` writes it); its
name is the log's origin. ``--out -`` prints the key.

``--config FILE`` names a TOML file with defaults: ``listen``, ``state``, ``log_key`` (a string or
a list) and ``name``; its relative paths are read from the file's directory. Flags win, and
``--log-key`` flags replace the file's list.

Exit status: 0 done, 1 a failure (the address cannot be listened on, the key cannot be written),
2 bad usage, 78 bad configuration (a log key, the config file or the state file unusable, or a
``--name`` other than the stored one).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.clock import now_ms
from common.transport import parse_listen
from protocol import note
from protocol.errors import BadFormat
from witness.server import Witness, serve
from witness.state import Identity, NameMismatch, State, StateError

EX_FAILURE = 1
EX_USAGE = 2
EX_CONFIG = 78
MAX_KEY_FILE_BYTES = 4096
MAX_CONFIG_BYTES = 64 * 1024
MAX_LOG_KEYS = 64
CONFIG_KEYS = ("listen", "state", "log_key", "name")

log = logging.getLogger("witness")


class Failed(Exception):
    """A command that cannot go on: the message, and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Settings:
    """The options, from the flags and the config file; ``origin`` says where each came from."""

    listen: str | None = None
    state: str | None = None
    log_key: list[str] = field(default_factory=list)
    name: str | None = None
    origin: dict[str, str] = field(default_factory=dict)

    def fail(self, key: str, message: str) -> Failed:
        """A bad value: a usage error if a flag gave it, a config error if the file did."""
        flag = f"--{key.replace('_', '-')}"
        where = self.origin.get(key, flag)
        return Failed(f"{where}: {message}", EX_USAGE if where == flag else EX_CONFIG)

    def require(self, key: str, metavar: str) -> str:
        value = getattr(self, key)
        if not value:
            raise Failed(f"--{key.replace('_', '-')} {metavar} is required (or {key} in --config FILE)",
                         EX_USAGE)
        return str(value)


def _read_bounded(path: str, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise Failed(f"{what} {path}: cannot read it ({exc.strerror})", EX_CONFIG) from None
    if len(data) > limit:
        raise Failed(f"{what} {path}: larger than {limit} bytes", EX_CONFIG)
    return data


def _config(path: str) -> Settings:
    data = _read_bounded(path, MAX_CONFIG_BYTES, "--config")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise Failed(f"--config {path}: not a TOML file ({exc})", EX_CONFIG) from None
    unknown = sorted(set(table) - set(CONFIG_KEYS))
    if unknown:
        raise Failed(f"--config {path}: unknown keys {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})",
                     EX_CONFIG)
    base = os.path.dirname(os.path.abspath(path))
    out = Settings()
    for key in ("listen", "state", "name"):
        if key in table:
            value = table[key]
            if not isinstance(value, str) or not value:
                raise Failed(f"--config {path}: {key} must be a non-empty string", EX_CONFIG)
            setattr(out, key, os.path.join(base, value) if key == "state" else value)
            out.origin[key] = f"--config {path}: {key}"
    if "log_key" in table:
        keys = table["log_key"]
        keys = [keys] if isinstance(keys, str) else keys
        if (not isinstance(keys, list) or not 0 < len(keys) <= MAX_LOG_KEYS
                or not all(isinstance(k, str) and k for k in keys)):
            raise Failed(f"--config {path}: log_key must be a file name or a list of 1 to {MAX_LOG_KEYS}",
                         EX_CONFIG)
        out.log_key = [os.path.join(base, k) for k in keys]
        out.origin["log_key"] = f"--config {path}: log_key"
    return out


def settings(args: argparse.Namespace) -> Settings:
    """The config file's values, overridden by the flags given."""
    s = _config(args.config) if args.config else Settings()
    for key in ("listen", "state", "name"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(s, key, value)
            s.origin[key] = f"--{key}"
    if getattr(args, "log_key", None):
        s.log_key = list(args.log_key)
        s.origin["log_key"] = "--log-key"
    if s.name is not None:
        try:
            note.check_name(s.name, "witness name")
        except BadFormat as exc:
            raise s.fail("name", str(exc)) from None
    return s


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as :func:`common.transport.parse_listen` reads it; port 0 asks the system
    for a free port (the log line "listening on" names it)."""
    host, sep, port = text.rpartition(":")
    if sep and port == "0" and host.strip("[]"):
        return host.strip("[]"), 0
    return parse_listen(text)


def load_log_key(path: str) -> note.Verifier:
    """A log's verifier key from ``path``; :class:`Failed` (78) naming the file."""
    data = _read_bounded(path, MAX_KEY_FILE_BYTES, "--log-key")
    try:
        verifier = note.parse_vkey(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise Failed(f"--log-key {path}: not UTF-8 text", EX_CONFIG) from None
    except BadFormat as exc:
        raise Failed(f"--log-key {path}: {exc}", EX_CONFIG) from None
    if verifier.kind != note.ED25519:
        raise Failed(f"--log-key {path}: a log signs with an Ed25519 (type 0x01) key, not type "
                     f"0x{verifier.kind:02x}", EX_CONFIG)
    return verifier


def load_log_keys(paths: Sequence[str]) -> dict[str, list[note.Verifier]]:
    """The trusted log keys, by origin (a log may have several)."""
    if len(paths) > MAX_LOG_KEYS:
        raise Failed(f"--log-key: at most {MAX_LOG_KEYS} keys", EX_USAGE)
    logs: dict[str, list[note.Verifier]] = {}
    for path in paths:
        verifier = load_log_key(path)
        keys = logs.setdefault(verifier.name, [])
        if verifier not in keys:
            keys.append(verifier)
    return logs


def open_state(path: str, name: str | None) -> tuple[State, Identity]:
    try:
        state = State(path)
    except StateError as exc:
        raise Failed(f"--state {exc}", EX_CONFIG) from None
    try:
        return state, state.identity(name, now_ms())
    except NameMismatch as exc:
        state.close()
        raise Failed(f"--name: {exc}", EX_CONFIG) from None
    except StateError as exc:
        state.close()
        raise Failed(f"--state {exc}", EX_CONFIG) from None


def cmd_serve(args: argparse.Namespace) -> int:
    s = settings(args)
    listen = s.require("listen", "HOST:PORT")
    state_path = s.require("state", "FILE")
    if not s.log_key:
        raise Failed("--log-key FILE is required (or log_key in --config FILE): the logs to witness",
                     EX_USAGE)
    try:
        host, port = listen_address(listen)
    except ValueError as exc:
        raise s.fail("listen", str(exc)) from None
    logs = load_log_keys(s.log_key)
    state, identity = open_state(state_path, s.name)
    try:
        log.info("witness %s: verifier key %s", identity.name, identity.verifier.vkey)
        for record in state.records():
            if record.cosigned.origin not in logs:
                log.info("%s: cosigned up to size %d, but no --log-key is given for it now",
                         record.cosigned.origin, record.cosigned.size)
        try:
            serve(Witness(state, identity, logs), host, port)
        except OSError as exc:
            raise Failed(f"--listen {listen}: cannot listen there ({exc.strerror or exc})",
                         EX_FAILURE) from None
    finally:
        state.close()
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    s = settings(args)
    state_path = s.require("state", "FILE")
    state, identity = open_state(state_path, s.name)
    state.close()
    text = identity.verifier.vkey + "\n"
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    try:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise Failed(f"--out {args.out}: cannot write it ({exc.strerror})", EX_FAILURE) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odo-witness",
                                     description="A witness that cosigns transparency log checkpoints "
                                                 "(c2sp.org/tlog-witness).")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="serve POST /add-checkpoint")
    p.add_argument("--config", metavar="FILE", help="TOML file with listen, state, log_key, name")
    p.add_argument("--listen", metavar="HOST:PORT", help="where to listen, e.g. 127.0.0.1:7380")
    p.add_argument("--state", metavar="FILE", help="the SQLite state file (made on first use)")
    p.add_argument("--log-key", metavar="FILE", action="append",
                   help="a log's verifier key, <origin>+<key ID>+<key>; again for more logs")
    p.add_argument("--name", help="the witness's key name, fixed at first use (default witness-<8 hex>)")
    p.set_defaults(func=cmd_serve)
    k = sub.add_parser("key", help="write the witness's verifier key")
    k.add_argument("--config", metavar="FILE", help="TOML file with state, name")
    k.add_argument("--state", metavar="FILE", help="the SQLite state file (made on first use)")
    k.add_argument("--out", metavar="FILE", required=True, help="where to write it; - for stdout")
    k.add_argument("--name", help="the witness's key name, if the state is new")
    k.set_defaults(func=cmd_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        status: int = args.func(args)
    except Failed as exc:
        print(f"odo-witness: {exc}", file=sys.stderr)
        return exc.status
    return status
