"""``odo-backend``: the backend's commands.

    odo-backend run     --db URL --broker URL --http HOST:PORT --rules FILE
                        [--fleet-token TOKEN] [--api-token TOKEN] [--tls-ca F --tls-cert F --tls-key F]
                        [--client-id ID] [--session-expiry S]
    odo-backend migrate --db URL
    odo-backend devices list|show DEV|approve DEV [--vin VIN]|revoke DEV --db URL [--json]
    odo-backend tokens  add --label L [--expires ISO8601] [--max-uses N] --db URL
    odo-backend tokens  list --db URL [--json]

plus the ledger's commands (:mod:`backend.cli_ledger`) and ``operators``
(:mod:`backend.cli_operators`). Every option also comes from ``ODO_*`` variables and
``--config FILE`` (:mod:`backend.config`); flags win.

Exit status: 0 done, 1 a failure (the database unreachable …), 2 bad input, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from backend import cli_ledger, cli_operators, devices, enrollment
from backend.config import (
    EX_USAGE,
    ConfigError,
    UsageError,
    add_config_argument,
    open_database,
    parse_time,
    run_config,
    settings,
)
from backend.db import Database, DatabaseError

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _iso(t_ms: int | None) -> str:
    if t_ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(t_ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _db(args: argparse.Namespace) -> Database:
    db = open_database(settings(args))
    try:
        db.migrate()
    except DatabaseError as exc:
        raise UsageError(str(exc)) from None
    return db


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# -- run ---------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from backend import service  # uvicorn and paho are loaded by the daemon only

    return service.run(run_config(settings(args)))


def cmd_migrate(args: argparse.Namespace) -> int:
    db = _db(args)
    db.close()
    print("the database schema is up to date")
    return 0


# -- devices -----------------------------------------------------------------------------------

def _device_line(d: dict[str, Any]) -> str:
    flag = f"  VIN CHANGED to {d['flagged_vin']}" if d.get("flagged_vin") else ""
    odo = f"{d['odo_m'] / 1000:.1f} km" if d["odo_m"] is not None else "-"
    return (f"{d['dev']}  {d['status']:<8}  {d['vin'] or '-':<17}  seq {d['last_seq']:<6}  {odo:>11}  "
            f"{'online ' if d['online'] else 'offline'}  seen {_iso(d['last_seen'])}{flag}")


def cmd_devices(args: argparse.Namespace) -> int:
    db = _db(args)
    try:
        action = args.devices_command
        if action == "list":
            rows = devices.list_devices(db)
            if args.json:
                _print_json(rows)
            else:
                for d in rows:
                    print(_device_line(d))
                if not rows:
                    print("no devices have enrolled yet")
            return 0
        who = f"cli:{getpass.getuser()}"
        if action == "show":
            d = devices.get_device(db, args.dev)
        elif action == "approve":
            d = devices.approve(db, args.dev, _now_ms(), who, args.vin)
        else:
            d = devices.revoke(db, args.dev, _now_ms(), who)
        if args.json:
            _print_json(d)
        else:
            print(_device_line(d))
            if action == "show":
                print(f"  pub {d['pub']}\n  accepted {d['accepted']}, rejected {d['rejected']}, "
                      f"backlog {d['backlog'] if d['backlog'] is not None else '-'}\n"
                      f"  enrolled {_iso(d['enrollment']['enrolled_at'])}, decided "
                      f"{_iso(d['enrollment']['decided_at'])} by {d['enrollment']['decided_by'] or '-'}")
        return 0
    except devices.DeviceError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()


# -- fleet tokens ------------------------------------------------------------------------------

def cmd_tokens(args: argparse.Namespace) -> int:
    db = _db(args)
    try:
        if args.tokens_command == "add":
            try:
                expires = parse_time(args.expires, "--expires") if args.expires else None
                token, row = enrollment.add_token(db, args.label, _now_ms(), expires, args.max_uses)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            print(token)
            print(f"fleet token {row.id} ({row.label}) added; it is shown only this once", file=sys.stderr)
            return 0
        tokens = enrollment.list_tokens(db)
        now = _now_ms()
        if args.json:
            _print_json([{"id": t.id, "label": t.label, "expires_at": t.expires_at, "max_uses": t.max_uses,
                          "uses": t.uses, "created_at": t.created_at, "usable": t.usable(now)}
                         for t in tokens])
            return 0
        for t in tokens:
            uses = f"{t.uses}/{t.max_uses}" if t.max_uses is not None else f"{t.uses}"
            state = "usable" if t.usable(now) else "spent or expired"
            print(f"{t.id}\t{t.label}\tuses {uses}\texpires {_iso(t.expires_at)}\t{state}")
        if not tokens:
            print("no fleet tokens: odo-backend tokens add --label LABEL --db URL")
        return 0
    finally:
        db.close()


# -- the parser --------------------------------------------------------------------------------

def _with_db(p: argparse.ArgumentParser, json_flag: bool = False) -> None:
    p.add_argument("--db", help="sqlite:///path/to/file.db or postgresql://… (also ODO_DB)")
    add_config_argument(p)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odo-backend", description="The odoledger backend.")
    parser.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"),
                        help="default: info (also ODO_LOG_LEVEL, or log_level in --config FILE)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="ingest records over MQTT and serve the HTTP API and dashboard")
    _with_db(p)
    p.add_argument("--broker", help="mqtt://[user:password@]host:port or mqtts://… (also ODO_BROKER)")
    p.add_argument("--http", metavar="HOST:PORT", help="where to serve HTTP, e.g. 127.0.0.1:8080")
    p.add_argument("--rules", metavar="FILE", help="the fleet partner's rules file (TOML)")
    p.add_argument("--fleet-token", help="devices enrolling with this token are approved at once")
    p.add_argument("--api-token", help="bearer token every /api request must carry")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate(s) of the broker (mqtts)")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (mqtts)")
    p.add_argument("--tls-key", metavar="FILE", help="client key (mqtts)")
    p.add_argument("--client-id", help="MQTT client id, one per backend process (default: odo-backend-HOST)")
    p.add_argument("--session-expiry", type=int, metavar="SECONDS", help="MQTT session expiry (default 300)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("migrate", help="bring the database schema up to date")
    _with_db(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("devices", help="list, show, approve or revoke devices")
    dsub = p.add_subparsers(dest="devices_command", required=True, metavar="list|show|approve|revoke")
    _with_db(dsub.add_parser("list", help="every device"), json_flag=True)
    for name, text in (("show", "one device"),
                       ("approve", "approve a device (a flagged one for its new VIN)"),
                       ("revoke", "revoke a device: its records are refused from now on")):
        q = dsub.add_parser(name, help=text)
        q.add_argument("dev", metavar="DEV")
        if name == "approve":
            q.add_argument("--vin", help="the VIN to approve it for (default: the VIN it now reads)")
        _with_db(q, json_flag=True)
    p.set_defaults(func=cmd_devices, vin=None)

    p = sub.add_parser("tokens", help="fleet tokens that approve enrolling devices at once")
    tsub = p.add_subparsers(dest="tokens_command", required=True, metavar="add|list")
    q = tsub.add_parser("add", help="make a token and print it (once)")
    q.add_argument("--label", required=True, help="what the token is for, e.g. a workshop")
    q.add_argument("--expires", metavar="ISO8601", help="when it stops working (UTC unless a zone is given)")
    q.add_argument("--max-uses", type=_positive, metavar="N", help="how many devices it may approve")
    _with_db(q)
    _with_db(tsub.add_parser("list", help="tokens, their uses and expiry (never the tokens)"), json_flag=True)
    p.set_defaults(func=cmd_tokens)

    cli_ledger.register(sub)
    cli_operators.register(sub)
    return parser


def _log_level(args: argparse.Namespace) -> int:
    """--log-level, ODO_LOG_LEVEL or the config file's log_level; info by default."""
    try:
        s = settings(args)
    except ConfigError:
        return logging.INFO                # the command itself reports what is wrong with the file
    name = str(s.get("log_level") or "info")
    if name.lower() not in ("debug", "info", "warning", "error"):
        raise s.error("log_level", f"{name!r}: use debug, info, warning or error")
    return int(getattr(logging, name.upper()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        logging.basicConfig(level=_log_level(args), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return func(args)
    except ConfigError as exc:
        print(f"odo-backend: {exc}", file=sys.stderr)
        return exc.status
    except UsageError as exc:
        print(f"odo-backend: {exc}", file=sys.stderr)
        return EX_USAGE
    except DatabaseError as exc:
        print(f"odo-backend: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
