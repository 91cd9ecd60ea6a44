"""``odo-backend operators``: the dashboard's operator accounts.

    odo-backend operators add USERNAME --db URL      # password from stdin, or asked twice on a terminal
    odo-backend operators passwd USERNAME --db URL   # new password; ends the operator's sessions
    odo-backend operators list --db URL [--json]

``--db`` also comes from ``ODO_DB`` or ``--config FILE`` (:mod:`backend.config`).
A password is never taken from a flag (it would show in ``ps`` and shell history).
Exit status: 0 done, 1 the database unreachable, 2 bad input (unusable name or
password, operator exists or missing, bad ``--db`` flag), 78 bad configuration.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

from backend.cli.common import Subparsers, add_db_options, database
from backend.errors import AuthError, UsageError
from backend.web import auth
from common.clock import now_ms

log = logging.getLogger(__name__)



def read_password(stdin: TextIO, prompt: Callable[[str], str] = getpass.getpass) -> str:
    """From a terminal: asked twice and compared. Otherwise: the first line of stdin."""
    if stdin.isatty():
        first = prompt("Password: ")
        if first != prompt("Password again: "):
            raise UsageError("passwords did not match")
        return first
    line = stdin.readline()
    if not line:
        raise UsageError("no password on stdin (pipe it in, or run on a terminal to be asked)")
    return line.rstrip("\r\n")



def cmd_add(args: argparse.Namespace) -> int:
    password = read_password(sys.stdin)
    db = database(args)
    try:
        auth.add_operator(db, args.username, password, now_ms())
    except AuthError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    print(f"operator {args.username} added")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    password = read_password(sys.stdin)
    db = database(args)
    try:
        auth.set_password(db, args.username, password)
    except AuthError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    print(f"password of {args.username} changed; their sessions have ended")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        operators = auth.list_operators(db, now_ms())
    finally:
        db.close()
    if args.json:
        print(json.dumps([{"username": o.username, "created_at": o.created_at, "sessions": o.sessions}
                          for o in operators]))
        return 0
    if not operators:
        print("no operators yet: odo-backend operators add USERNAME --db URL")
    for o in operators:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(o.created_at // 1000))
        print(f"{o.username}\tcreated {created}\t{o.sessions} active session(s)")
    return 0



def register(subparsers: Subparsers) -> None:
    """Add ``operators`` to the ``odo-backend`` sub-commands; each sets ``func(args) -> int``."""
    parser = subparsers.add_parser("operators", help="dashboard operator accounts",
                                   description="Dashboard operator accounts.")
    sub = parser.add_subparsers(dest="operators_command", required=True, metavar="add|passwd|list")
    for name, func, text in (("add", cmd_add, "add an operator (password from stdin or a prompt)"),
                             ("passwd", cmd_passwd, "set an operator's password (from stdin or a prompt)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("username")
        add_db_options(p)
        p.set_defaults(func=func)
    p = sub.add_parser("list", help="list operators", description="List operators.")
    add_db_options(p)
    p.add_argument("--json", action="store_true", help="one JSON array")
    p.set_defaults(func=cmd_list)
