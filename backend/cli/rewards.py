"""``odo-backend rewards``: check the rewards credited::

    odo-backend rewards audit --db URL --rules FILE [--json]   # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import json

from backend.cli.common import Subparsers, add_db_options, database, load_rules_setting
from backend.ledger import audit


def cmd_audit(args: argparse.Namespace) -> int:
    rules = load_rules_setting(args)
    db = database(args)
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


def register(sub: Subparsers) -> None:
    rewards = sub.add_parser("rewards", help="check the rewards credited",
                             description="Check the rewards credited.")
    rsub = rewards.add_subparsers(dest="rewards_command", required=True, metavar="audit")
    p = rsub.add_parser("audit", help="recompute every credit from the accepted records; exit 1 on any "
                                      "difference")
    p.add_argument("--rules", metavar="FILE", help="the rules file (default: $ODO_RULES)")
    add_db_options(p, json_flag=True)
    p.set_defaults(func=cmd_audit)
