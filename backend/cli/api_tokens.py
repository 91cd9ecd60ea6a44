"""``odo-backend api-tokens``: the JSON API's bearer tokens, each with a role
(:mod:`backend.web.roles`)::

    odo-backend api-tokens add NAME --role operator|partner|driver [--driver ID] [--expires ISO8601] --db URL
    odo-backend api-tokens list --db URL [--json]
    odo-backend api-tokens revoke NAME --db URL

``add`` prints the token once, on stdout (only its hash is stored); ``--driver`` names the
driver of a ``driver`` token and is refused with the other roles. ``list`` never shows a token.
``revoke`` stops a token at once; revoking it again changes nothing. Once any token exists,
every ``/api`` path needs one (or the ``api_token`` setting).
Exit status: 0 done, 1 the database unreachable, 2 bad input (name, role, driver, expiry; a
name in use or unknown), 78 bad configuration.
"""

from __future__ import annotations

import argparse
import sys

from backend.cli.common import Subparsers, add_db_options, database, iso, print_json
from backend.config import parse_time
from backend.errors import UsageError
from backend.web import api_tokens
from backend.web.roles import DRIVER, ROLES
from common.clock import now_ms


def cmd_add(args: argparse.Namespace) -> int:
    if args.role == DRIVER and args.driver is None:
        raise UsageError(f"--driver: required with --role {DRIVER}")
    if args.role != DRIVER and args.driver is not None:
        raise UsageError(f"--driver: only with --role {DRIVER}, not {args.role}")
    now = now_ms()
    expires = parse_time(args.expires, "--expires") if args.expires else None
    if expires is not None and expires <= now:
        raise UsageError(f"--expires: {args.expires} is not in the future")
    db = database(args)
    try:
        token, made = api_tokens.add(db, args.token_name, args.role, args.driver, expires, now)
    except api_tokens.ApiTokenError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    print(token)
    print(f"API token {made.name} ({made.label}) added; it is shown only this once", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        tokens = api_tokens.list_tokens(db)
    finally:
        db.close()
    now = now_ms()
    if args.json:
        print_json([t.to_dict(now) for t in tokens])
        return 0
    if not tokens:
        print("no API tokens: odo-backend api-tokens add NAME --role ROLE --db URL")
    for t in tokens:
        print(f"{t.name}\t{t.label}\texpires {iso(t.expires_at)}\tcreated {iso(t.created_at)}\t"
              f"{t.state(now)}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        token, revoked = api_tokens.revoke(db, args.token_name, now_ms())
    except api_tokens.ApiTokenError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    if revoked:
        print(f"API token {token.name} ({token.label}) revoked")
    else:
        print(f"API token {token.name} ({token.label}) was already revoked at {iso(token.revoked_at)}")
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("api-tokens", help="bearer tokens of the JSON API, each with a role",
                       description="Bearer tokens of the JSON API (/api), each with a role: operator "
                                   "(everything), partner (catalogue, wallets, redemptions), driver (one "
                                   "driver's own wallet).")
    tsub = p.add_subparsers(dest="api_tokens_command", required=True, metavar="add|list|revoke")
    q = tsub.add_parser("add", help="make a token and print it (once)")
    q.add_argument("token_name", metavar="NAME", help="what the token is for, e.g. partner-shop-north")
    q.add_argument("--role", required=True, choices=ROLES, help="what the token may do")
    q.add_argument("--driver", metavar="ID", help="the driver of a driver token (required with that role)")
    q.add_argument("--expires", metavar="ISO8601", help="when it stops working (UTC unless a zone is given)")
    add_db_options(q)
    q.set_defaults(func=cmd_add)
    q = tsub.add_parser("list", help="tokens, their roles, expiry and state (never the tokens)")
    add_db_options(q, json_flag=True)
    q.set_defaults(func=cmd_list)
    q = tsub.add_parser("revoke", help="stop a token at once")
    q.add_argument("token_name", metavar="NAME")
    add_db_options(q)
    q.set_defaults(func=cmd_revoke)
