"""``odo-backend`` commands of the ledger side::

    odo-backend drivers add ID [--name NAME] --db URL
    odo-backend drivers assign ID --vin VIN [--from ISO8601] --db URL
    odo-backend drivers list --db URL [--json]
    odo-backend rewards audit --db URL --rules FILE [--json]   # exit 1 on any difference
    odo-backend certificate VIN --db URL --out FILE
    odo-backend log-key --db URL --out FILE                   # the log's public verifier key (PEM)
    odo-backend checkpoint --db URL [--json]                  # sign a checkpoint of the log now

Options also come from ``ODO_*`` variables and ``--config FILE`` (see :mod:`backend.config`).
Exit status: 0 done, 1 the audit found differences, 2 bad input, 78 a bad rules or config file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from backend import assignments, audit, certificate, translog
from backend.config import (
    EX_CONFIG,
    ConfigError,
    Settings,
    UsageError,
    add_config_argument,
    parse_time,
    settings,
)
from backend.db import Database, DatabaseError
from backend.rules import Rules, RulesError, load_rules

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _iso(t_ms: int) -> str:
    return datetime.datetime.fromtimestamp(t_ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _db(s: Settings) -> Database:
    url = str(s.require("db"))
    try:
        db = Database.open(url)
        db.migrate()
    except DatabaseError as exc:
        raise s.error("db", str(exc).removeprefix("--db ").removeprefix("--db: ")) from None
    return db


def _rules(s: Settings) -> Rules:
    path = str(s.require("rules"))
    if not os.path.isfile(path):
        raise s.error("rules", f"{path}: no such file")
    try:
        return load_rules(path)
    except RulesError as exc:
        raise ConfigError("--rules", str(exc), EX_CONFIG) from None


def _write(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write it ({exc.strerror})") from None


# -- commands ---------------------------------------------------------------------------------

def cmd_drivers_add(args: argparse.Namespace, s: Settings) -> int:
    db = _db(s)
    try:
        d = assignments.add_driver(db, args.driver_id, args.name, _now_ms())
    except assignments.AssignmentError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    print(f"driver {d.id} added; wallet driver:{d.id}")
    return 0


def cmd_drivers_assign(args: argparse.Namespace, s: Settings) -> int:
    now = _now_ms()
    start = parse_time(args.valid_from, "--from") if args.valid_from else now
    db = _db(s)
    try:
        moved = assignments.assign(db, args.driver_id, args.vin, start, now)
    except assignments.AssignmentError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    total = sum(t.amount for t in moved)
    print(f"{args.driver_id} drives {args.vin} from {_iso(start)}"
          + (f"; moved {len(moved)} earlier reward(s), {total} milli-tokens, to driver:{args.driver_id}"
             if moved else ""))
    return 0


def cmd_drivers_list(args: argparse.Namespace, s: Settings) -> int:
    db = _db(s)
    try:
        rows = assignments.drivers(db, _now_ms())
    finally:
        db.close()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no drivers yet: odo-backend drivers add ID --db URL")
    for d in rows:
        current = [a["vin"] for a in d["assignments"] if a["current"]]
        name = f" ({d['name']})" if d["name"] else ""
        print(f"{d['id']}{name}\tbalance {d['balance']} milli-tokens\t"
              f"drives {', '.join(current) if current else 'nothing now'}")
    return 0


def cmd_rewards_audit(args: argparse.Namespace, s: Settings) -> int:
    rules = _rules(s)
    db = _db(s)
    try:
        problems = audit.audit(db, rules)
    finally:
        db.close()
    if args.json:
        print(json.dumps(audit.summary(problems)))
    else:
        for line in problems:
            print(line)
        print(f"audit with rules {rules.version}: " + (f"{len(problems)} difference(s)" if problems
                                                        else "every credit matches"))
    return 1 if problems else 0


def cmd_certificate(args: argparse.Namespace, s: Settings) -> int:
    out = str(s.require("out"))
    db = _db(s)
    try:
        cert = certificate.build(db, args.vin, _now_ms())
    except certificate.CertificateError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    from protocol import certificate as pc

    _write(out, pc.encode(cert))
    print(f"certificate for {args.vin}: {len(cert['records'])} records from {len(cert['devices'])} "
          f"device(s) written to {out}; check it with: odo-verify {out} --log-key LOG_KEY.pem")
    return 0


def cmd_log_key(args: argparse.Namespace, s: Settings) -> int:
    out = str(s.require("out"))
    db = _db(s)
    try:
        key = translog.public_key(db)
    finally:
        db.close()
    _write(out, key.to_pem())
    print(f"log key {key.id} written to {out}")
    return 0


def cmd_checkpoint(args: argparse.Namespace, s: Settings) -> int:
    db = _db(s)
    try:
        cp = translog.checkpoint(db, _now_ms())
    finally:
        db.close()
    print(json.dumps(cp) if args.json else f"checkpoint of {cp['size']} entries, root {cp['root']}, "
          f"signed {_iso(cp['t'])} by log key {cp['kid']}")
    return 0


# -- wiring -----------------------------------------------------------------------------------

def _run(func: Callable[[argparse.Namespace, Settings], int]) -> Callable[[argparse.Namespace], int]:
    """Hand the command its settings; ``backend.cli.main`` turns errors into exit statuses."""
    return lambda args: func(args, settings(args))


def _common(p: argparse.ArgumentParser, *, out: bool = False, json_flag: bool = False) -> None:
    p.add_argument("--db", help="sqlite:///path or postgresql://… (default: $ODO_DB)")
    add_config_argument(p)
    if out:
        p.add_argument("--out", metavar="FILE", help="where to write it")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON")


def register(subparsers: Any) -> None:
    """Add ``drivers``, ``rewards``, ``certificate``, ``log-key`` and ``checkpoint``; each sets
    ``func(args) -> int`` (the exit status)."""
    drivers = subparsers.add_parser("drivers", help="drivers and their vehicles",
                                    description="Drivers, and the vehicles they are assigned to.")
    dsub = drivers.add_subparsers(dest="drivers_command", required=True, metavar="add|assign|list")
    p = dsub.add_parser("add", help="add a driver (and so the wallet driver:ID)")
    p.add_argument("driver_id", metavar="ID")
    p.add_argument("--name", help="the driver's name, for people")
    _common(p)
    p.set_defaults(func=_run(cmd_drivers_add))
    p = dsub.add_parser("assign", help="assign a driver to a vehicle from a time on",
                        description="Assign a driver to a vehicle from --from (default: now) on; the "
                                    "vehicle's previous assignment ends then, and rewards for its readings "
                                    "since then that wait unassigned move to the driver.")
    p.add_argument("driver_id", metavar="ID")
    p.add_argument("--vin", required=True, help="the vehicle's VIN")
    p.add_argument("--from", dest="valid_from", metavar="ISO8601", help="start (UTC unless a zone is given)")
    _common(p)
    p.set_defaults(func=_run(cmd_drivers_assign))
    p = dsub.add_parser("list", help="list drivers, balances and current vehicles")
    _common(p, json_flag=True)
    p.set_defaults(func=_run(cmd_drivers_list))

    rewards = subparsers.add_parser("rewards", help="check the rewards credited",
                                    description="Check the rewards credited.")
    rsub = rewards.add_subparsers(dest="rewards_command", required=True, metavar="audit")
    p = rsub.add_parser("audit", help="recompute every credit from the accepted records; exit 1 on any "
                                      "difference")
    p.add_argument("--rules", metavar="FILE", help="the rules file (default: $ODO_RULES)")
    _common(p, json_flag=True)
    p.set_defaults(func=_run(cmd_rewards_audit))

    p = subparsers.add_parser("certificate", help="write a vehicle's mileage certificate",
                              description="Write a vehicle's mileage certificate: its records, their "
                                          "inclusion proofs and a signed checkpoint (check it with "
                                          "odo-verify).")
    p.add_argument("vin", metavar="VIN")
    _common(p, out=True)
    p.set_defaults(func=_run(cmd_certificate))

    p = subparsers.add_parser("log-key", help="write the transparency log's public key (PEM)")
    _common(p, out=True)
    p.set_defaults(func=_run(cmd_log_key))

    p = subparsers.add_parser("checkpoint", help="sign a checkpoint of the transparency log now")
    _common(p, json_flag=True)
    p.set_defaults(func=_run(cmd_checkpoint))
