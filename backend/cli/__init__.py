"""``odo-backend``: the backend's commands, one module per command group::

    odo-backend run|migrate           backend.cli.run         the daemon; the schema
    odo-backend devices …             backend.cli.devices     list, show, approve, revoke
    odo-backend tokens …              backend.cli.tokens      fleet tokens
    odo-backend drivers …             backend.cli.drivers     drivers and their vehicles
    odo-backend rewards audit         backend.cli.rewards     recompute every credit
    odo-backend rules publish|list    backend.cli.rules       the published versions of the rules
    odo-backend certificate|log-key|checkpoint
                                      backend.cli.log         the transparency log
    odo-backend operators …           backend.cli.operators   dashboard accounts
    odo-backend vehicles allowance    backend.cli.vehicles    lease mileage allowances
    odo-backend export mileage|ledger backend.cli.export      CSV files for the fleet manager
    odo-backend api-tokens …          backend.cli.api_tokens  the JSON API's tokens and roles

Every option also comes from ``ODO_*`` variables and ``--config FILE`` (:mod:`backend.config`);
flags win.

Exit status: 0 done, 1 a failure (the database unreachable, an audit that found differences),
2 bad input, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys

from backend.cli import (
    api_tokens,
    devices,
    drivers,
    export,
    log,
    operators,
    rewards,
    rules,
    run,
    tokens,
    vehicles,
)
from backend.cli.common import Command
from backend.config import LOG_FORMAT, settings
from backend.errors import EX_USAGE, ConfigError, DatabaseError, UsageError

#: The command groups, in the order ``odo-backend --help`` lists them.
GROUPS = (run, devices, tokens, drivers, rewards, rules, log, operators, api_tokens, vehicles, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odo-backend", description="The odoledger backend.")
    parser.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"),
                        help="default: info (also ODO_LOG_LEVEL, or log_level in --config FILE)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
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
        logging.basicConfig(level=_log_level(args), format=LOG_FORMAT)
        return func(args)
    except ConfigError as exc:
        print(f"odo-backend: {exc}", file=sys.stderr)
        return exc.status
    except UsageError as exc:
        print(f"odo-backend: {exc}", file=sys.stderr)
        return EX_USAGE
    except DatabaseError as exc:
        print(f"odo-backend: database: {exc}", file=sys.stderr)
        return 1
