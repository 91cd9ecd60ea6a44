"""``odo-backend rules``: publish a version of the fleet partner's rules; list those published::

    odo-backend rules publish FILE --db URL [--json]   # the same file again: nothing new, exit 0
    odo-backend rules list --db URL [--json]

What publishing checks, and which version decides what, is :mod:`backend.ledger.contracts`. A
file that cannot be read or published is exit status 78, as a wrong ``--rules`` is.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from backend.cli.common import Subparsers, add_db_options, database, iso, print_json
from backend.errors import EX_CONFIG, ConfigError, RulesError, UsageError
from backend.ledger import contracts
from backend.ledger.rules import load_rules
from common.clock import now_ms


def cmd_publish(args: argparse.Namespace) -> int:
    path = str(args.file)
    if not os.path.isfile(path):
        raise UsageError(f"FILE: {path}: no such file")
    try:
        rules = load_rules(path)
    except RulesError as exc:
        raise ConfigError("rules publish", str(exc), EX_CONFIG) from None
    db = database(args)
    try:
        done = contracts.publish(db, rules, now_ms())
    except RulesError as exc:
        raise ConfigError("rules publish", str(exc), EX_CONFIG) from None
    finally:
        db.close()
    v = done.version
    if args.json:
        print_json({"published": done.new, "id": v.id, "version": v.name, "sha256": v.sha256,
                    "effective_from": v.effective_from, "published_at": v.published_at})
    elif done.new:
        print(f"published rules {v.name} (sha256 {v.sha256}): in force from {iso(v.effective_from)}")
    else:
        print(f"rules {v.name} (sha256 {v.sha256}) were published already, at {iso(v.published_at)}: "
              "nothing new")
    return 0


def _state(v: dict[str, Any]) -> str:
    return "in force" if v["in_force"] else "upcoming" if v["upcoming"] else "superseded"


def cmd_list(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        listed = contracts.versions(db, now_ms())
    except RulesError as exc:
        raise ConfigError("rules list", str(exc), EX_CONFIG) from None
    finally:
        db.close()
    if args.json:
        print_json(listed)
        return 0
    for v in listed:
        start = iso(v["effective_from"]) if v["effective_from"] else "the beginning"
        print(f"{v['id']}\t{v['version']}\tfrom {start}\tsha256 {v['sha256']}\t"
              f"published {iso(v['published_at'])}\t{_state(v)}")
    if not listed:
        print("no rules published: odo-backend rules publish FILE --db URL")
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("rules", help="publish a version of the rules; list the published versions",
                       description="The fleet partner's rules, as published versions.")
    rsub = p.add_subparsers(dest="rules_command", required=True, metavar="publish|list")
    q = rsub.add_parser("publish", help="validate a rules file and publish it as a new version")
    q.add_argument("file", metavar="FILE", help="the rules file (TOML), with its effective_from")
    add_db_options(q, json_flag=True)
    q.set_defaults(func=cmd_publish)
    q = rsub.add_parser("list", help="the published versions, by effective_from")
    add_db_options(q, json_flag=True)
    q.set_defaults(func=cmd_list)
