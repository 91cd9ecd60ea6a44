"""Ingest: verifying, storing, logging and crediting batches of records, beside bare verify.

    .venv/bin/python -m bench.ingest [--devices 4] [--records 2000] [--batch 400] [--no-pg] [--no-mqtt]

Each device's chain is odometer readings with a trip every tenth record (so the distance rule
credits). Figures, as records per second: ``protocol.records.verify``; ``store.process_batch``
on a temporary SQLite file and on a fresh PostgreSQL schema in ``$ODO_TEST_PG`` (new records,
then the same batches again as replays); and end to end, ``odo-backend run`` on a private
mosquitto with devices publishing a batch and waiting for its ack. The baseline of each is
the bare Ed25519 verify of the same signatures by the library the backend uses
(``protocol.identity.LIBRARY``: libsodium when PyNaCl is installed), measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import statistics
import tempfile
import time
import uuid
import warnings
from pathlib import Path

from backend.db import Database
from backend.ledger.rules import Rules
from backend.records import store
from protocol import b64, identity, records
from protocol.records import Record
from sim.devices import FLEET_TOKEN, Dongle, batch, enroll, load_test_rules, write_rules
from sim.mqtt_device import MqttDevice
from sim.stack import Stack

PG_URL = os.environ.get("ODO_TEST_PG", "postgresql://127.0.0.1:5432/test")


def _chains(devices: int, n: int) -> list[tuple[Dongle, list[Record]]]:
    out = []
    for _ in range(devices):
        d = Dongle()
        out.append((d, [d.trip(3, minutes=5) if i % 10 == 9 else d.odometer(1) for i in range(n)]))
    return out


def _verify_alone(chains: list[tuple[Dongle, list[Record]]]) -> float:
    """Ed25519 verifications per second of the same signatures, with nothing around them, by
    the library the backend verifies with (``protocol.identity.LIBRARY``)."""
    bare = identity.LIBRARIES[identity.LIBRARY]
    work = []
    for d, recs in chains:
        for r in recs:
            head, body, sig = r.jws.split(".")
            work.append((d.key.public.raw, b64.decode(sig), f"{head}.{body}".encode()))
    start = time.perf_counter()
    for key, signature, data in work:
        assert bare(key, signature, data)
    return len(work) / (time.perf_counter() - start)


def _protocol_verify(chains: list[tuple[Dongle, list[Record]]]) -> float:
    start, n = time.perf_counter(), 0
    for d, recs in chains:
        for r in recs:
            records.verify(r.jws, d.key.public)
            n += 1
    return n / (time.perf_counter() - start)


def _store(url: str, chains: list[tuple[Dongle, list[Record]]], size: int,
           rules: Rules) -> tuple[float, float]:
    """(new records per second, replayed records per second) through ``store.process_batch``."""
    db = Database.open(url)
    db.migrate()
    for d, _ in chains:
        enroll(db, d)
    bodies = [(d.dev, batch(*recs[i:i + size])) for d, recs in chains for i in range(0, len(recs), size)]
    total = sum(len(recs) for _, recs in chains)
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        for dev, body in bodies:
            ack = store.process_batch(db, rules, dev, body, 1_800_000_000_000).ack
            assert not ack.rejected, ack
        rates.append(total / (time.perf_counter() - start))
    db.close()
    return rates[0], rates[1]


def _end_to_end(chains: list[tuple[Dongle, list[Record]]], size: int, tmp: Path) -> float:
    """Records per second through ``odo-backend run``: publish a batch, wait for its ack."""
    with Stack(tmp / "e2e", rules=write_rules(tmp), fleet_token=FLEET_TOKEN) as stack:
        stack.start_broker()
        stack.start_backend()
        assert stack.backend is not None
        agents = [MqttDevice(d, "127.0.0.1", stack.broker_port).__enter__() for d, _ in chains]
        for a in agents:
            assert a.enroll()[0] == "approved"
        start = time.perf_counter()
        for i in range(0, len(chains[0][1]), size):
            for a, (_, recs) in zip(agents, chains, strict=True):
                a.client.publish(f"odo/v1/{a.device.dev}/records", batch(*recs[i:i + size]), qos=1)
            for a in agents:
                try:
                    a.acks.get(timeout=60)
                except queue.Empty:
                    raise SystemExit(f"no ack:\n{stack.backend.log.read_text()}") from None
        elapsed = time.perf_counter() - start
        for a in agents:
            a.__exit__()
    return sum(len(recs) for _, recs in chains) / elapsed


def _row(name: str, ours: float, base_name: str, base: float) -> None:
    print(f"{name:<38}{ours / 1000:>7.1f}k rec/s   {base_name} {base / 1000:.1f}k/s".ljust(92)
          + f"{ours / base:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest",
                              description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--records", type=int, default=2000, help="per device")
    ap.add_argument("--batch", type=int, default=400, help="400 odometer records fill about 210 KiB")
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--no-mqtt", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore", ResourceWarning)
    print(f"{args.devices} devices × {args.records} records, batches of {args.batch}; Python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs")
    chains = _chains(args.devices, args.records)
    alone = statistics.median(_verify_alone(chains) for _ in range(3))
    print(f"{'operation':<38}{'ours':>13}   baseline".ljust(92) + "ratio")
    _row("verify a record (protocol)", _protocol_verify(chains), f"{identity.LIBRARY} verify alone", alone)
    with tempfile.TemporaryDirectory() as tmp:
        rules = load_test_rules(Path(tmp))
        new, replay = _store(f"sqlite:///{tmp}/bench.db", chains, args.batch, rules)
        _row(f"ingest batches of {args.batch} (SQLite)", new, "verify alone", alone)
        _row("  the same again: replays (SQLite)", replay, "verify alone", alone)
        if not args.no_pg:
            schema = f"odo_bench_{uuid.uuid4().hex[:12]}"
            try:
                new, replay = _store(f"{PG_URL}?schema={schema}", chains, args.batch, rules)
                _row(f"ingest batches of {args.batch} (PostgreSQL)", new, "verify alone", alone)
                _row("  the same again: replays (PostgreSQL)", replay, "verify alone", alone)
            finally:
                import psycopg

                with psycopg.connect(PG_URL, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if not args.no_mqtt:
            write_rules(Path(tmp))
            rate = _end_to_end(_chains(args.devices, args.records), args.batch, Path(tmp))
            _row("end to end: odo-backend run, SQLite", rate, "verify alone", alone)


if __name__ == "__main__":
    main()

