"""What every ``odo-backend`` command module shares: the database options, the open-and-migrate
step, and printing times and JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Callable
from typing import Any, Protocol

from backend.config import add_config_argument, migrated_database, settings
from backend.db import Database
from backend.errors import EX_CONFIG, ConfigError, RulesError, UsageError
from backend.ledger.rules import Rules, load_rules

#: A command: parsed arguments in, exit status out.
Command = Callable[[argparse.Namespace], int]


class Subparsers(Protocol):
    """What ``argparse.ArgumentParser.add_subparsers()`` returns, as far as the commands use it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def add_db_options(p: argparse.ArgumentParser, *, json_flag: bool = False, out: bool = False) -> None:
    """``--db`` and ``--config`` (and ``--json`` or ``--out`` where the command has them)."""
    p.add_argument("--db", help="sqlite:///path/to/file.db or postgresql://… (also ODO_DB)")
    add_config_argument(p)
    if out:
        p.add_argument("--out", metavar="FILE", help="where to write it")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON")


def add_log_origin(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-origin", metavar="NAME",
                   help="the transparency log's name, e.g. odoledger.example.net/log; fixed at first use")


def database(args: argparse.Namespace) -> Database:
    """The command's database, migrated; a bad ``--db`` is a usage or config error."""
    return migrated_database(settings(args))


def load_rules_setting(args: argparse.Namespace) -> Rules:
    """The rules file named by ``--rules`` (or ``ODO_RULES``, or the config file), validated."""
    s = settings(args)
    path = str(s.require("rules"))
    if not os.path.isfile(path):
        raise s.error("rules", f"{path}: no such file")
    try:
        return load_rules(path)
    except RulesError as exc:
        raise ConfigError("--rules", str(exc), EX_CONFIG) from None


def iso(t_ms: int | None) -> str:
    if t_ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(t_ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def write_file(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write it ({exc.strerror})") from None


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)
