"""``odo-backend rewards``: check the rewards credited::

    odo-backend rewards audit --db URL [--rules FILE] [--json]   # exit 1 on any difference

The audit recomputes every credit under the version of the rule book (published in the
database) in force at its reading time. ``--rules FILE`` is used only for a database no version
was published to (that one file at every time, as before versions); otherwise the audit notes on
stderr whether the file is one of the published versions, and audits by the book all the same.
"""

from __future__ import annotations

import argparse
import json
import sys

from backend.cli.common import Subparsers, add_db_options, database, load_rules_setting
from backend.config import settings
from backend.errors import ConfigError, RulesError
from backend.ledger import audit, contracts


def cmd_audit(args: argparse.Namespace) -> int:
    given = load_rules_setting(args) if settings(args).get("rules") is not None else None
    db = database(args)
    try:
        try:
            book = contracts.load_book(db)
        except RulesError as exc:
            raise ConfigError("rules", f"a published version cannot be read: {exc}") from None
        if not book.versions and given is None:
            raise ConfigError("rules", "no rules version is published in the database: give --rules "
                                       "FILE, the rules it was credited by (or publish it: odo-backend "
                                       "rules publish)")
        if book.versions and given is not None:
            digest = contracts.sha256_of(given)
            same = next((v for v in book.versions if v.sha256 == digest), None)
            print(f"note: {given.source} " + (f"is the published version {same.name}" if same is not None else
                                               f"(version {given.version}) is not published; the audit "
                                               "uses the published versions"), file=sys.stderr)
        problems = audit.audit(db, given)
    finally:
        db.close()
    if not book.versions:
        assert given is not None
        book = contracts.book_of(given)
    names = ", ".join(v.name for v in book.versions)
    if args.json:
        print(json.dumps({**audit.summary(problems), "rules_versions": [v.name for v in book.versions]}))
    else:
        for line in problems:
            print(line)
        print(f"audit with rules {names}: " + (f"{len(problems)} difference(s)" if problems
                                                else "every credit matches"))
    return 1 if problems else 0


def register(sub: Subparsers) -> None:
    rewards = sub.add_parser("rewards", help="check the rewards credited",
                             description="Check the rewards credited.")
    rsub = rewards.add_subparsers(dest="rewards_command", required=True, metavar="audit")
    p = rsub.add_parser("audit", help="recompute every credit from the accepted records, each under the "
                                      "rules version in force at its time; exit 1 on any difference")
    p.add_argument("--rules", metavar="FILE", help="the rules file, for a database no rules version was "
                                                   "published to (default: $ODO_RULES)")
    add_db_options(p, json_flag=True)
    p.set_defaults(func=cmd_audit)
