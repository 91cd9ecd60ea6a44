"""``odo-backend tokens``: fleet tokens that approve enrolling devices at once::

    odo-backend tokens add --label L [--expires ISO8601] [--max-uses N] --db URL
    odo-backend tokens list --db URL [--json]
"""

from __future__ import annotations

import argparse
import sys

from backend.cli.common import Subparsers, add_db_options, database, iso, positive, print_json
from backend.config import parse_time
from backend.errors import UsageError
from backend.records import enrollment
from common.clock import now_ms


def cmd_tokens(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        if args.tokens_command == "add":
            try:
                expires = parse_time(args.expires, "--expires") if args.expires else None
                token, row = enrollment.add_token(db, args.label, now_ms(), expires, args.max_uses)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            print(token)
            print(f"fleet token {row.id} ({row.label}) added; it is shown only this once", file=sys.stderr)
            return 0
        tokens = enrollment.list_tokens(db)
        now = now_ms()
        if args.json:
            print_json([{"id": t.id, "label": t.label, "expires_at": t.expires_at, "max_uses": t.max_uses,
                         "uses": t.uses, "created_at": t.created_at, "usable": t.usable(now)}
                        for t in tokens])
            return 0
        for t in tokens:
            uses = f"{t.uses}/{t.max_uses}" if t.max_uses is not None else f"{t.uses}"
            state = "usable" if t.usable(now) else "spent or expired"
            print(f"{t.id}\t{t.label}\tuses {uses}\texpires {iso(t.expires_at)}\t{state}")
        if not tokens:
            print("no fleet tokens: odo-backend tokens add --label LABEL --db URL")
        return 0
    finally:
        db.close()


def register(sub: Subparsers) -> None:
    p = sub.add_parser("tokens", help="fleet tokens that approve enrolling devices at once")
    tsub = p.add_subparsers(dest="tokens_command", required=True, metavar="add|list")
    q = tsub.add_parser("add", help="make a token and print it (once)")
    q.add_argument("--label", required=True, help="what the token is for, e.g. a workshop")
    q.add_argument("--expires", metavar="ISO8601", help="when it stops working (UTC unless a zone is given)")
    q.add_argument("--max-uses", type=positive, metavar="N", help="how many devices it may approve")
    add_db_options(q)
    add_db_options(tsub.add_parser("list", help="tokens, their uses and expiry (never the tokens)"),
                   json_flag=True)
    p.set_defaults(func=cmd_tokens)
