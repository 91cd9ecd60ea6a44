"""Transparency log: appends, roots and proofs from stored subtrees, against naive recomputation.

    .venv/bin/python -m bench.translog [--sizes 1000,10000,100000] [--pg-sizes 1000,10000] [--no-pg]

At each log size it measures, as rates: an append in its own write transaction
(as ingest makes it) beside a bare one-row insert transaction; the root from
stored subtrees (what a checkpoint costs) beside the naive root (read every leaf
hash, hash the whole tree); an inclusion proof beside the naive proof. Ratio =
ours ÷ baseline. It runs on a temporary SQLite file, then on a fresh PostgreSQL
schema in ``$ODO_TEST_PG`` (smaller sizes), and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from backend.db import Database
from backend.transparency import translog
from protocol import merkle

PG_URL = os.environ.get("ODO_TEST_PG", "postgresql://127.0.0.1:5432/test")


def _rate(fn: Callable[[], object], repeat: int) -> float:
    """Calls per second: the median of ``repeat`` timed calls."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return 1 / statistics.median(runs)


def _paired(a: Callable[[], object], b: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Rates of ``a`` and ``b`` timed in alternation, so that both see the same disk."""
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeat):
        for fn, runs in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
    return 1 / statistics.median(ta), 1 / statistics.median(tb)


def _fmt(rate: float) -> str:
    return f"{rate / 1000:.1f}k/s" if rate >= 1000 else f"{rate:.1f}/s"


class Log:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.n = 0
        with db.write() as tx:
            tx.execute("CREATE TABLE bench_rows (id {bigint} PRIMARY KEY, body {blob} NOT NULL)".replace(
                "{bigint}", "BIGINT").replace("{blob}", "BYTEA" if db.dialect == "postgresql" else "BLOB"))

    def grow(self, to: int) -> None:
        with self.db.write() as tx:
            for i in range(self.n, to):
                translog.append(tx, "record", f"bench-{i}", b"entry %d" % i)
        self.n = max(self.n, to)
        translog.integrate_all(self.db)

    def append(self) -> None:
        with self.db.write() as tx:
            translog.append(tx, "transfer", f"bench-{self.n}", b"entry %d" % self.n)
        self.n += 1

    def bare_insert(self) -> None:
        with self.db.write() as tx:
            tx.execute("INSERT INTO bench_rows (id, body) VALUES (?, ?)", (self.n, b"entry %d" % self.n))
        self.n += 1

    def leaves(self) -> list[bytes]:
        with self.db.read() as tx:
            return [bytes(r["leaf_hash"]) for r in tx.query("SELECT leaf_hash FROM translog ORDER BY idx")]

    def root(self) -> bytes:
        with self.db.read() as tx:
            return translog.root(tx)

    def proof(self) -> list[bytes]:
        with self.db.read() as tx:
            size = translog.size(tx)
            return translog.inclusion_proofs(tx, [size // 3], size)[0]

    def naive_proof(self) -> list[bytes]:
        leaves = self.leaves()
        return merkle.inclusion_proof(len(leaves) // 3, leaves)


def measure(db: Database, label: str, sizes: list[int]) -> None:
    log = Log(db)
    for size in sizes:
        log.grow(size - 50)
        ours, bare = _paired(log.append, log.bare_insert, 50)
        rows = [("append, own transaction", ours, "one-row insert transaction", bare)]
        started = time.perf_counter()
        translog.integrate_all(db)               # the sequencer: the 50 entries just stored
        integrated = 50 / (time.perf_counter() - started)
        rows.append(("integrate 50 stored (sequencer)", integrated, "one-row insert transaction", bare))
        log.grow(size)
        assert log.root() == merkle.root(log.leaves())
        assert log.proof() == log.naive_proof()
        rows.append(("root", _rate(log.root, 30), "naive root", _rate(lambda: merkle.root(log.leaves()), 3)))
        rows.append(("inclusion proof", _rate(log.proof, 30), "naive proof", _rate(log.naive_proof, 3)))
        for name, ours, base_name, base in rows:
            print(f"{name + f' at {size:,} leaves ({label})':<58} {_fmt(ours):>10}   "
                  f"{base_name + ' ' + _fmt(base):<36} {ours / base:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.translog",
                                  description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="log sizes for SQLite")
    parser.add_argument("--pg-sizes", default="1000,10000", help="log sizes for PostgreSQL")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    print(f"transparency log: leaves of ~10 bytes, one append per transaction; Python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs; SQLite sizes {args.sizes}, "
          f"PostgreSQL sizes {'-' if args.no_pg else args.pg_sizes}")
    print(f"{'operation':<58} {'ours':>10}   {'baseline':<36} {'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        db = Database.open(f"sqlite:///{Path(tmp) / 'bench.db'}")
        db.migrate()
        measure(db, "SQLite", sorted(int(s) for s in args.sizes.split(",")))
        db.close()
    if args.no_pg:
        return
    schema = f"odo_bench_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in PG_URL else "?"
    db = Database.open(f"{PG_URL}{sep}schema={schema}")
    try:
        db.migrate()
        measure(db, "PostgreSQL", sorted(int(s) for s in args.pg_sizes.split(",")))
    finally:
        db.close()
        admin = Database.open(PG_URL)
        with admin.write() as tx:
            tx.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


if __name__ == "__main__":
    main()
