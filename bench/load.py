"""Load on ``odo-backend run`` end to end, through a private mosquitto, beside the raw verify rate.

    .venv/bin/python -m bench.load [--parts 1,2,3,4] [--devices 100] [--records 400] [--batch 200]
        [--inflight 2] [--rates 500,1000,1500,2000,3000,4000] [--step-s 4] [--backlog 100000]
        [--no-pg] [--out bench-results.md]

1. Ingest: ``--devices`` simulated devices, each with its own key and chain and enrolled with the
   fleet token first, publish pre-signed batches of ``--batch`` records as fast as the acks allow,
   ``--inflight`` batches in flight each; accepted records per second (the acks' ``through``),
   on SQLite and on a fresh PostgreSQL schema in ``$ODO_TEST_PG``, and the backend's
   CPU-seconds per 1,000 records.
2. Two ``odo-backend run`` processes on one PostgreSQL schema, sharing the broker's
   subscription (each its own ``--client-id`` and ``--http`` port), against one: throughput,
   CPU per 1,000 records, and the CPU of every process taking part (both backends, mosquitto,
   PostgreSQL, the load generator, the rest of the machine).
3. Latency: ``--latency-devices`` devices, each its own key and seq, at fixed offered rates in
   messages of 1 to ``--max-per-message`` records: p50 and p99 from the publish to the ack that
   covers each record, and the highest rate held with p99 ≤ 1 s (steps stop at the first that
   is not). Everything is signed before a step's clock starts; one paho client publishes for
   every device and reports its own CPU and how far behind its schedule it fell.
4. Drain: a real ``odo-agent run`` (no adapter answering) whose outbox already holds
   ``--backlog`` records signed with its own key; the time until the backend has acknowledged
   them all, through the agent's own sync window, against ``--backlog`` ÷ the one-process rate
   of part 1.

The baseline of every rate is ``protocol.identity.VerifyKey.verify`` (the function the backend
checks signatures with), measured just before each part on records like the parts' own; the
libraries' own verify calls (``cryptography``, and PyNaCl when installed) are measured beside
it. Times and costs have ratios of ours ÷ baseline too, so their goals read "≤". The table goes
to stdout and to ``--out``; progress goes to stderr. Nothing is asserted about speed.

The load generator's connection has ``TCP_NODELAY`` (:class:`sim.mqtt_device.MqttFleet`);
``--broker-nodelay`` gives mosquitto ``set_tcp_nodelay true`` too. Without them, a message
that follows another on a connection can wait for the delayed ACK of the first (40 ms).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from agent import identity as agent_identity
from agent.buffer import Outbox
from agent.state import VIN
from protocol import jws, messages
from protocol.identity import VerifyKey
from protocol.messages import Ack
from protocol.records import Record
from sim.cars import Car, CarSpec, init_agent
from sim.devices import FLEET_TOKEN, Dongle, batch, fresh_vin, write_rules
from sim.mqtt_device import MqttFleet
from sim.processes import ROOT, Proc, descendants, free_port
from sim.stack import Stack

PG_URL = os.environ.get("ODO_TEST_PG", "postgresql://127.0.0.1:5432/test")
CLK_TCK = os.sysconf("SC_CLK_TCK")
P99_GOAL_S = 1.0
VERIFY_SAMPLE = 1000            # signatures per round of a baseline measurement
VERIFY_ROUNDS = 5               # rounds; the fastest is kept (other load only ever slows one down)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- options, each bounded --------------------------------------------------------------------------

def _bounded(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if len(text) > 12:
            raise argparse.ArgumentTypeError(f"{text[:12]!r}…: too long for an integer")
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value
    return parse


def _int_list(lo: int, hi: int, most: int) -> Callable[[str], list[int]]:
    one = _bounded(lo, hi)

    def parse(text: str) -> list[int]:
        if len(text) > 200:
            raise argparse.ArgumentTypeError("longer than 200 characters")
        items = [one(t.strip()) for t in text.split(",") if t.strip()]
        if not 1 <= len(items) <= most:
            raise argparse.ArgumentTypeError(f"give 1 to {most} comma-separated values, got {len(items)}")
        if sorted(set(items)) != items:
            raise argparse.ArgumentTypeError(f"{text!r}: values must be distinct and increasing")
        return items
    return parse


# -- CPU accounting from /proc ---------------------------------------------------------------------

def _stat_cpu(path: str) -> float | None:
    """utime + stime in seconds from a /proc stat file (None once the process has gone)."""
    try:
        with open(path) as fh:
            text = fh.read(4096)
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()     # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu(pid: int) -> float | None:
    return _stat_cpu(f"/proc/{pid}/stat")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU-seconds of each thread of ``pid`` so far."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids[:1000]:
        cpu = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        if cpu is not None:
            out[int(tid)] = cpu
    return out


def machine_busy() -> float:
    """CPU-seconds every core of the machine has spent busy (not idle, not waiting for I/O)."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass(frozen=True)
class CpuUse:
    """CPU-seconds each named group of processes used over ``wall`` seconds, and the machine's."""

    wall: float
    groups: dict[str, float]
    machine: float
    busiest_thread: dict[str, float]        # per group with threads watched: its busiest thread's

    def cores(self, name: str) -> float:
        return self.groups.get(name, 0.0) / self.wall if self.wall > 0 else 0.0

    def describe(self) -> str:
        parts = [f"{name} {self.cores(name):.2f}" for name in self.groups]
        rest = max(0.0, self.machine - sum(self.groups.values()))
        parts.append(f"everything else on the machine {rest / self.wall:.2f}")
        threads = "; ".join(f"{name}'s busiest thread {s / self.wall:.2f}"
                            for name, s in self.busiest_thread.items())
        return (f"cores used over {self.wall:.1f} s: " + ", ".join(parts)
                + f" (machine {self.machine / self.wall:.2f} of {os.cpu_count()})"
                + (f"; {threads}" if threads else ""))


class CpuMeter:
    """Watches named groups of processes (their pids asked again at the end, so that processes
    started meanwhile, e.g. a PostgreSQL connection, count from zero)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]], threads_of: Sequence[str] = ()) -> None:
        self.groups = groups
        self.threads_of = threads_of
        self._before: dict[int, float] = {}
        self._threads: dict[str, dict[int, float]] = {}
        self._t0 = 0.0
        self._busy0 = 0.0

    def _pids(self, name: str) -> list[int]:
        try:
            return self.groups[name]()
        except Exception as exc:  # noqa: BLE001 - e.g. PostgreSQL unreachable: that group counts 0
            log(f"  (cannot list the processes of {name}: {exc})")
            return []

    def start(self) -> None:
        self._before = {}
        for name in self.groups:
            for pid in self._pids(name):
                cpu = proc_cpu(pid)
                if cpu is not None:
                    self._before[pid] = cpu
        self._threads = {name: {tid: s for pid in self._pids(name) for tid, s in thread_cpu(pid).items()}
                         for name in self.threads_of}
        self._busy0 = machine_busy()
        self._t0 = time.monotonic()

    def stop(self) -> CpuUse:
        wall = time.monotonic() - self._t0
        busy = machine_busy() - self._busy0
        used: dict[str, float] = {}
        for name in self.groups:
            total = 0.0
            for pid in self._pids(name):
                cpu = proc_cpu(pid)
                if cpu is not None:
                    total += cpu - self._before.get(pid, 0.0)
            used[name] = total
        busiest: dict[str, float] = {}
        for name in self.threads_of:
            before = self._threads.get(name, {})
            deltas = [s - before.get(tid, 0.0)
                      for pid in self._pids(name) for tid, s in thread_cpu(pid).items()]
            busiest[name] = max(deltas, default=0.0)
        return CpuUse(wall, used, busy, busiest)


# -- PostgreSQL --------------------------------------------------------------------------------------

@contextmanager
def database(kind: str, tmp: Path, tag: str) -> Iterator[tuple[str, str | None]]:
    """(URL, schema): a SQLite file under ``tmp``, or a fresh schema in ``$ODO_TEST_PG`` whose
    connections carry the schema as their application name (dropped afterwards)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / tag}.db", None
        return
    schema = f"odo_load_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}schema={schema}&application_name={schema}", schema
    finally:
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


class Postgres:
    """A connection of the benchmark's own, to find the server's processes and its table counters."""

    def __init__(self) -> None:
        import psycopg

        sep = "&" if "?" in PG_URL else "?"
        self.conn = psycopg.connect(f"{PG_URL}{sep}application_name=odo_load_meter", autocommit=True)

    def close(self) -> None:
        self.conn.close()

    def version(self) -> str:
        row = self.conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def pids_of(self, app: str) -> list[int]:
        rows = self.conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,))
        return [int(r[0]) for r in rows.fetchall()]

    def server_pids(self) -> list[int]:
        """The server's own processes (checkpointer, WAL writer, …), shared with whoever else uses it."""
        rows = self.conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'")
        return [int(r[0]) for r in rows.fetchall()]

    def table_writes(self, schema: str) -> dict[str, tuple[int, int, int]]:
        """(rows inserted, rows updated, index scans) per table of ``schema`` so far."""
        rows = self.conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, COALESCE(idx_scan, 0) FROM pg_stat_user_tables "
            "WHERE schemaname = %s", (schema,))
        return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows.fetchall()}


def pg_note(pg: Postgres, schema: str, accepted: int) -> str:
    """Rows written and index scans per accepted record, from the schema's table counters (once
    the backends have stopped: a connection reports its counters at most once a second, and
    one that has gone idle only when it exits)."""
    time.sleep(0.5)
    stats = pg.table_writes(schema)
    if not stats or accepted <= 0:
        return "no table counters"
    ins = sum(s[0] for s in stats.values())
    upd = sum(s[1] for s in stats.values())
    scans = sum(s[2] for s in stats.values())
    top = sorted(stats.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:6]
    by_table = ", ".join(f"{name} {(i + u) / accepted:.2f}" for name, (i, u, _) in top if i + u)
    return (f"per accepted record: {ins / accepted:.2f} rows inserted, {upd / accepted:.2f} updated, "
            f"{scans / accepted:.1f} index scans; rows written by table: {by_table}")


# -- records and the verify baseline -----------------------------------------------------------------

def next_record(d: Dongle) -> Record:
    """The next record of a chain: an odometer reading every 10 s, a trip every tenth record."""
    if (d.seq + 1) % 10 == 0:
        return d.trip(0.5, minutes=1)
    return d.odometer(0.2, dt_ms=10_000)


def chains(devices: int, n: int) -> list[tuple[Dongle, list[Record]]]:
    out = []
    for _ in range(devices):
        d = Dongle()
        out.append((d, [next_record(d) for _ in range(n)]))
    return out


@dataclass(frozen=True)
class VerifyRates:
    protocol: float                  # protocol.identity.VerifyKey.verify: the baseline
    cryptography: float              # Ed25519PublicKey.verify, the key loaded once
    nacl: float | None               # nacl.signing.VerifyKey.verify, the key loaded once


def _rate(calls: Sequence[Callable[[], object]]) -> float:
    start = time.perf_counter()
    for call in calls:
        call()
    return len(calls) / (time.perf_counter() - start)


def verify_rates(sample: Sequence[tuple[VerifyKey, Record]]) -> VerifyRates:
    """Verifications per second of the same signatures through each path (the fastest of
    :data:`VERIFY_ROUNDS` rounds)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    work = [(key, jws.split(rec.jws)) for key, rec in sample]
    ours = [partial(key.verify, c.signature, c.signing_input) for key, c in work]
    loaded = {key.raw: Ed25519PublicKey.from_public_bytes(key.raw) for key, _ in work}
    lib = [partial(loaded[key.raw].verify, c.signature, c.signing_input) for key, c in work]
    na: list[Callable[[], object]] | None = None
    try:
        import nacl.signing

        nkeys = {key.raw: nacl.signing.VerifyKey(key.raw) for key, _ in work}
        na = [partial(nkeys[key.raw].verify, c.signing_input, c.signature) for key, c in work]
    except ImportError:
        pass
    rates: dict[str, list[float]] = {"protocol": [], "cryptography": [], "nacl": []}
    for _ in range(VERIFY_ROUNDS):
        rates["protocol"].append(_rate(ours))
        rates["cryptography"].append(_rate(lib))
        if na is not None:
            rates["nacl"].append(_rate(na))
    return VerifyRates(max(rates["protocol"]), max(rates["cryptography"]),
                       max(rates["nacl"]) if rates["nacl"] else None)


# -- part 1 and 2: devices publishing as fast as the acks allow ----------------------------------

@dataclass
class _Device:
    dev: str
    bodies: list[bytes]              # batch k holds seqs k*size+1 .. (k+1)*size
    last: int                        # the chain's last seq
    through: int = 0
    next: int = 0                    # the next batch to publish
    out: int = 0                     # batches published, not acknowledged yet
    last_ack: float = 0.0
    done_at: float | None = None


class Feeder:
    """Publishes every device's batches, ``inflight`` at a time each, one more per ack. When all
    of a device's batches in flight are acknowledged and ``through`` is still short of what was
    sent (a later batch reached a backend process before an earlier one: a gap), it sends again
    from ``through + 1``, as an agent would; and the same after ``stall_s`` without an ack."""

    def __init__(self, fleet: MqttFleet, chains_: Sequence[tuple[Dongle, list[Record]]], size: int,
                 inflight: int, stall_s: float) -> None:
        self.fleet, self.size, self.inflight, self.stall_s = fleet, size, inflight, stall_s
        self.devices: dict[str, _Device] = {}
        for d, recs in chains_:
            bodies = [batch(*recs[i:i + size]) for i in range(0, len(recs), size)]
            self.devices[d.dev] = _Device(d.dev, bodies, recs[-1].seq)
        self._lock = threading.Lock()
        self.finished = threading.Event()
        self.remaining = len(self.devices)
        self.acks = self.gaps = self.resends = self.stalls = self.rejected = 0
        self.published = 0

    def on_ack(self, dev: str, ack: Ack, at: float) -> None:
        with self._lock:
            d = self.devices.get(dev)
            if d is None:
                return
            self.acks += 1
            self.rejected += len(ack.rejected)
            if ack.through <= d.through and d.through < d.last:
                self.gaps += 1
            d.through = max(d.through, ack.through)
            d.out = max(0, d.out - 1)
            d.last_ack = at
            if d.through >= d.last:
                if d.done_at is None:
                    d.done_at = at
                    self.remaining -= 1
                    if self.remaining == 0:
                        self.finished.set()
                return
            if d.out == 0 and d.through < min(d.last, d.next * self.size):
                d.next = d.through // self.size
                self.resends += 1
            self._fill(d)

    def _fill(self, d: _Device) -> None:
        while d.out < self.inflight and d.next < len(d.bodies):
            self.fleet.publish(d.dev, d.bodies[d.next])
            d.next += 1
            d.out += 1
            self.published += 1

    def run(self, timeout_s: float) -> tuple[float, float]:
        """Publish until every chain is acknowledged; (start, end) in monotonic seconds."""
        start = time.monotonic()
        with self._lock:
            for d in self.devices.values():
                d.last_ack = start
                self._fill(d)
        progress, seen = start, -1
        while not self.finished.wait(1.0):
            now = time.monotonic()
            with self._lock:
                through = sum(d.through for d in self.devices.values())
                if through != seen:
                    progress, seen = now, through
                for d in self.devices.values():
                    if d.done_at is None and now - d.last_ack > self.stall_s:
                        d.out, d.next, d.last_ack = 0, d.through // self.size, now
                        self.stalls += 1
                        self._fill(d)
            if now - progress > timeout_s:
                raise TimeoutError(f"no ack moved `through` for {timeout_s:.0f} s "
                                   f"({seen} of {self.total} records acknowledged)")
        end = max(d.done_at or 0.0 for d in self.devices.values())
        return start, end

    @property
    def total(self) -> int:
        return sum(d.last for d in self.devices.values())

    def accepted(self) -> int:
        return sum(d.through for d in self.devices.values())


@dataclass
class IngestResult:
    db: str
    processes: int
    accepted: int
    elapsed: float
    cpu: CpuUse
    backend_cpu: float
    gaps: int
    resends: int
    stalls: int
    rejected: int
    commands: list[str]
    counts: str
    pg: str | None = None

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed

    @property
    def cpu_per_1k(self) -> float:
        return self.backend_cpu / self.accepted * 1000


def _stack(workdir: Path, db_url: str, args: argparse.Namespace) -> Stack:
    workdir.mkdir(parents=True, exist_ok=True)
    return Stack(workdir, db_url=db_url, rules=write_rules(workdir), fleet_token=FLEET_TOKEN,
                 broker_conf="set_tcp_nodelay true\n" if args.broker_nodelay else "")


def _argv(proc: Proc) -> str:
    """The command line a process was started with, quoted for a shell."""
    args = proc.popen.args
    if isinstance(args, (str, bytes, os.PathLike)):
        return str(args)
    return shlex.join(str(a) for a in args)


def broker_drops(stack: Stack) -> int:
    """How many times mosquitto logged that it dropped messages for a client (a full queue)."""
    if stack.broker is None or not stack.broker.log.exists():
        return 0
    with open(stack.broker.log, errors="replace") as fh:
        return sum(1 for line in fh if "dropped" in line.lower())


def _tail(proc: Proc | None) -> str:
    if proc is None or not proc.log.exists():
        return ""
    return proc.log.read_text(errors="replace")[-3000:]


def _start_backends(stack: Stack, processes: int) -> list[int]:
    """Start the broker and ``processes`` backends; their HTTP ports."""
    stack.start_broker()
    stack.start_backend(client_id="odo-load-1")
    ports = [stack.http_port]
    for n in range(2, processes + 1):
        ports.append(free_port())
        stack.start_backend(client_id=f"odo-load-{n}", http_port=ports[-1])
    return ports


def backend_counts(port: int, token: str) -> dict[str, float]:
    """From a backend's /metrics: records handled by outcome, batches and failed messages."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read(4 * 1024 * 1024).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        log(f"  (no /metrics from the backend on port {port}: {exc})")
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.fullmatch(line.strip())
        if m is None:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "odo_records_total":
            status = re.search(r'status="([a-z_]{1,40})"', labels)
            key = status.group(1) if status else "?"
            out[key] = out.get(key, 0.0) + value
        elif name == "odo_ingest_seconds_count":
            out["batches"] = value
        elif name == "odo_ingest_seconds_sum":
            out["seconds"] = value
        elif name == "odo_ingest_errors_total":
            out["errors"] = value
    return out


_METRIC = re.compile(r"([a-z_]{1,80})(\{[^}]{0,400}\})? ([0-9.e+-]{1,40})")


def counts_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _counts_text(counts: Sequence[dict[str, float]]) -> str:
    """Records by outcome and batches per process, and the mean time a batch was in the handler
    (``odo_ingest_seconds``: verify, store, publish the ack; in a worker, so they overlap)."""
    parts = []
    for n, c in enumerate(counts, 1):
        figures = ", ".join(f"{int(v)} {name}" for name, v in sorted(c.items()) if v and name != "seconds")
        if c.get("batches"):
            figures += f", {c.get('seconds', 0.0) / c['batches'] * 1000:.1f} ms a batch in the handler"
        parts.append(f"process {n}: {figures or 'nothing'}" if len(counts) > 1 else figures or "nothing")
    return "; ".join(parts)


def _pid_of(proc: Proc) -> list[int]:
    """A backend's process and those it started: its CPU is theirs too."""
    return [proc.pid, *descendants(proc.pid)]


def _meter(stack: Stack, pg: Postgres | None, app: str | None, extra: dict[str, Callable[[], list[int]]]
           ) -> CpuMeter:
    groups: dict[str, Callable[[], list[int]]] = {}
    for n, proc in enumerate(stack.backends, 1):
        groups[f"backend {n}" if len(stack.backends) > 1 else "backend"] = partial(_pid_of, proc)
    assert stack.broker is not None
    broker = stack.broker
    groups["mosquitto"] = lambda: [broker.pid]
    if pg is not None and app is not None:
        groups["postgres (our connections)"] = lambda: pg.pids_of(app)
        groups["postgres (server processes)"] = pg.server_pids
    groups["load generator"] = lambda: [os.getpid()]
    groups.update(extra)
    return CpuMeter(groups, threads_of=[g for g in groups if g.startswith("backend")])


def ingest(kind: str, processes: int, chains_: Sequence[tuple[Dongle, list[Record]]],
           args: argparse.Namespace, tmp: Path) -> IngestResult:
    """One run of part 1 (or 2): fresh database and broker, ``processes`` backends."""
    tag = f"ingest-{kind}-{processes}"
    with database(kind, tmp, tag) as (url, schema), _stack(tmp / tag, url, args) as stack:
        pg = Postgres() if schema is not None else None
        try:
            ports = _start_backends(stack, processes)
            with MqttFleet("127.0.0.1", stack.broker_port, client_id=f"odo-load-{tag}") as fleet:
                feeder = Feeder(fleet, chains_, args.batch, args.inflight, args.stall_s)
                fleet.on_ack = feeder.on_ack
                answers = fleet.enroll([d for d, _ in chains_])
                refused = [a for a in answers.values() if a[0] != "approved"]
                if refused:
                    raise SystemExit(f"{len(refused)} enrolments not approved, e.g. {refused[0]}")
                meter = _meter(stack, pg, schema, {})
                meter.start()
                try:
                    start, end = feeder.run(args.stall_s * 2)
                except TimeoutError as exc:
                    raise SystemExit(f"{tag}: {exc}\n{_tail(stack.backend)}") from None
                cpu = meter.stop()
            counts = [backend_counts(port, stack.api_token) for port in ports]
            accepted = feeder.accepted()
            result = IngestResult(
                kind, processes, accepted, end - start, cpu,
                sum(s for g, s in cpu.groups.items() if g.startswith("backend")),
                feeder.gaps, feeder.resends, feeder.stalls, feeder.rejected,
                [_argv(p) for p in stack.backends], _counts_text(counts))
            if pg is not None and schema is not None:
                stack.close()                      # a backend's table counters reach the server as it exits
                result.pg = pg_note(pg, schema, accepted)
            return result
        finally:
            if pg is not None:
                pg.close()


# -- part 3: latency at fixed offered rates ------------------------------------------------------------

@dataclass
class _Step:
    rate: int
    p50: float
    p99: float
    records: int
    lost: int
    achieved: float                   # records per second actually published
    lag_p99: float                    # how far behind schedule the generator published (s)
    cpu: CpuUse
    drops: int                        # mosquitto's "dropping messages" warnings during the step
    handled: str                      # what the backend's /metrics counted during the step

    @property
    def held(self) -> bool:
        return self.lost == 0 and self.p99 <= P99_GOAL_S


class LatencyProbe:
    """Which ack covers which message: per device, its messages in flight (last seq, publish
    time, records), popped in order as acks' ``through`` pass them."""

    def __init__(self) -> None:
        self.pending: dict[str, deque[tuple[int, float, int]]] = {}
        self.samples: list[tuple[float, int]] = []      # (latency in s, records)
        self.done = threading.Event()
        self.outstanding = 0
        self._lock = threading.Lock()

    def sent(self, dev: str, last_seq: int, at: float, n: int) -> None:
        with self._lock:
            self.pending.setdefault(dev, deque()).append((last_seq, at, n))
            self.outstanding += 1
            self.done.clear()

    def on_ack(self, dev: str, ack: Ack, at: float) -> None:
        with self._lock:
            queue = self.pending.get(dev)
            while queue and queue[0][0] <= ack.through:
                _, sent_at, n = queue.popleft()
                self.samples.append((at - sent_at, n))
                self.outstanding -= 1
            if self.outstanding == 0:
                self.done.set()

    def reset(self) -> tuple[list[tuple[float, int]], int]:
        """The samples so far and how many records are still waiting for an ack; forget both."""
        with self._lock:
            samples, self.samples = self.samples, []
            lost = sum(n for q in self.pending.values() for _, _, n in q)
            self.pending = {}
            self.outstanding = 0
            return samples, lost


def percentile(samples: Sequence[tuple[float, int]], lost: int, q: float) -> float:
    """The record-weighted ``q`` quantile; records never acknowledged count as infinitely late."""
    total = sum(n for _, n in samples) + lost
    if total == 0:
        return float("nan")
    rank, seen = q * total, 0
    for latency, n in sorted(samples):
        seen += n
        if seen >= rank:
            return latency
    return float("inf")


def _schedule(dongles: Sequence[Dongle], rate: int, seconds: int, most: int,
              rng: random.Random) -> list[tuple[float, str, int, int, bytes]]:
    """Messages (due time, device, last seq, records, body) offering ``rate`` records a second,
    every one signed now; the devices take turns, in a shuffled order."""
    order = list(dongles)
    rng.shuffle(order)
    sizes: list[int] = []
    while sum(sizes) < rate * seconds:
        sizes.append(rng.randint(1, most))
    total = sum(sizes)
    out, due = [], 0.0
    for i, n in enumerate(sizes):
        d = order[i % len(order)]
        recs = [next_record(d) for _ in range(n)]
        out.append((due, d.dev, recs[-1].seq, n, batch(*recs)))
        due += n / rate
    assert abs(due - total / rate) < 1e-6
    return out


def round_trip(port: int, samples: int = 200) -> float:
    """The median time of a QoS 1 publish to the client's own subscription through mosquitto."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="odo-load-echo", protocol=mqtt.MQTTv5)
    c.on_message = lambda *a: got.set()
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_connect = lambda client, *a: client.subscribe("odo-load/echo", qos=1)
    c.connect("127.0.0.1", port)
    sock = c.socket()
    if isinstance(sock, socket.socket):         # as the load generator's (sim.mqtt_device.MqttFleet)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.loop_start()
    try:
        if not subscribed.wait(5):
            raise TimeoutError("no SUBACK for the round-trip probe within 5 s")
        times = []
        for _ in range(samples):
            got.clear()
            t = time.perf_counter()
            c.publish("odo-load/echo", b"x" * 200, qos=1)
            if not got.wait(5):
                raise TimeoutError("the round-trip probe's message did not come back within 5 s")
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        c.disconnect()
        c.loop_stop()


def latency(args: argparse.Namespace, tmp: Path) -> tuple[list[_Step], float, list[str]]:
    """Part 3: the steps run (stopping after the first not held), the broker round trip, and
    the backend's command."""
    rng = random.Random(1)
    dongles = [Dongle() for _ in range(args.latency_devices)]
    steps: list[_Step] = []
    tag = "latency"
    with database(args.latency_db, tmp, tag) as (url, schema), _stack(tmp / tag, url, args) as stack:
        pg = Postgres() if schema is not None else None
        try:
            ports = _start_backends(stack, 1)
            rtt = round_trip(stack.broker_port)
            probe = LatencyProbe()
            with MqttFleet("127.0.0.1", stack.broker_port, client_id="odo-load-latency",
                           on_ack=probe.on_ack) as fleet:
                fleet.enroll(dongles)
                for rate in args.rates:
                    log(f"  offering {rate} records/s for {args.step_s} s")
                    plan = _schedule(dongles, rate, args.step_s, args.max_per_message, rng)
                    meter = _meter(stack, pg, schema, {})
                    lags: list[float] = []
                    drops = broker_drops(stack)
                    before = backend_counts(ports[0], stack.api_token)
                    meter.start()
                    t0 = time.monotonic() + 0.05
                    first = last = 0.0
                    for i, (due, dev, last_seq, n, body) in enumerate(plan):
                        wait = t0 + due - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                        now = time.monotonic()
                        probe.sent(dev, last_seq, now, n)
                        fleet.publish(dev, body)
                        lags.append(now - (t0 + due))
                        if i == 0:
                            first = now
                        last = now
                    probe.done.wait(args.drain_s)
                    cpu = meter.stop()
                    handled = _counts_text([counts_delta(backend_counts(ports[0], stack.api_token), before)])
                    samples, lost = probe.reset()
                    published = sum(p[3] for p in plan)
                    lags.sort()
                    step = _Step(rate, percentile(samples, lost, 0.5), percentile(samples, lost, 0.99),
                                 published, lost, published / max(last - first, 1e-9),
                                 lags[int(0.99 * (len(lags) - 1))], cpu, broker_drops(stack) - drops,
                                 handled)
                    steps.append(step)
                    log(f"    p50 {step.p50 * 1000:.0f} ms, p99 {step.p99 * 1000:.0f} ms, "
                        f"{lost} records unacknowledged after {args.drain_s} s")
                    if not step.held:
                        break
            return steps, rtt, [_argv(p) for p in stack.backends]
        finally:
            if pg is not None:
                pg.close()


# -- part 4: one agent's backlog ---------------------------------------------------------------------

@dataclass
class DrainResult:
    backlog: int
    elapsed: float
    cpu: CpuUse
    agent_command: str
    batches: int


def drain(args: argparse.Namespace, tmp: Path) -> DrainResult:
    """Part 4: fill a fresh agent's outbox with ``--backlog`` records signed with its key, then
    time ``odo-agent run`` until the backend has acknowledged the last."""
    tag = "drain"
    with database(args.agent_db, tmp, tag) as (url, schema), _stack(tmp / tag, url, args) as stack:
        pg = Postgres() if schema is not None else None
        try:
            _start_backends(stack, 1)
            vin = fresh_vin()
            car = Car("dongle", CarSpec(vin, 0.0), tmp / tag / "agent")
            with socket.socket() as s:             # an adapter address nothing answers on
                s.bind(("127.0.0.1", 0))
                car.port = f"socket://127.0.0.1:{s.getsockname()[1]}"
            init_agent(car, stack.broker_url, FLEET_TOKEN,
                       f'clock = "synced"\nmax_records = {max(50_000, 2 * args.backlog)}\n')
            key = agent_identity.load(car.state_dir)
            log(f"  signing {args.backlog} records into the agent's outbox")
            outbox = Outbox.open(car.state_dir / "outbox.db")
            try:
                VIN.put(outbox, vin)
                d = Dongle(key=key, vin=vin)

                def build(seq: int, prev: str) -> Record:
                    rec = next_record(d)
                    assert (rec.seq, rec.prev) == (seq, prev)
                    return rec

                left = args.backlog
                while left:
                    n = min(left, 5000)
                    outbox.append([build] * n)
                    left -= n
            finally:
                outbox.close()
            enrolled = stack.agent_cli(car, "enroll", "--wait", "20", timeout=40)
            if enrolled.returncode != 0:
                raise SystemExit(f"odo-agent enroll exited {enrolled.returncode}: {enrolled.stderr.strip()}")
            done = threading.Event()
            acks = [0]
            ended: list[float] = []

            def on_ack(dev: str, ack: Ack, at: float) -> None:
                if dev == car.dev:
                    acks[0] += 1
                    if ack.through >= args.backlog:
                        ended.append(at)
                        done.set()

            with MqttFleet("127.0.0.1", stack.broker_port, client_id="odo-load-observer", on_ack=on_ack):
                agent_pid: list[int] = []
                meter = _meter(stack, pg, schema, {"agent": lambda: agent_pid})
                meter.start()
                start = time.monotonic()
                agent = stack.start_agent(car, wait=False)
                agent_pid.append(agent.pid)
                limit = args.stall_s + 10 * args.backlog / 1000
                while not done.wait(1.0):
                    if not agent.running():
                        raise SystemExit(f"odo-agent run exited {agent.popen.returncode}:\n{_tail(agent)}")
                    if time.monotonic() - start > limit:
                        raise SystemExit(f"the backlog was not acknowledged within {limit:.0f} s:\n"
                                         f"{_tail(agent)}\n{_tail(stack.backend)}")
                cpu = meter.stop()
            return DrainResult(args.backlog, ended[0] - start, cpu,
                               _argv(agent), acks[0])
        finally:
            if pg is not None:
                pg.close()


# -- the table ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    what: str
    figure: str
    baseline: str
    ratio: float | None
    goal: str = "—"
    met: bool | None = None


@dataclass
class Report:
    setup: str
    command: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        met = "" if row.met is None else (" (met)" if row.met else " (not met)")
        ratio = "" if row.ratio is None else f", ratio {row.ratio:.2f}"
        log(f"  {row.what}: {row.figure}{ratio}{met}")

    def markdown(self) -> str:
        lines = ["# bench.load: odo-backend run under load", "", self.setup, "", f"`{self.command}`", "",
                 "| what | figure | baseline | ratio | goal | met |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            ratio = "—" if r.ratio is None else f"{r.ratio:.2f}"
            met = "—" if r.met is None else ("yes" if r.met else "**no**")
            lines.append(f"| {r.what} | {r.figure} | {r.baseline} | {ratio} | {r.goal} | {met} |")
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def k(rate: float) -> str:
    return f"{rate / 1000:.2f}k/s" if rate < 10_000 else f"{rate / 1000:.1f}k/s"


def ms(seconds: float) -> str:
    if seconds == float("inf"):
        return "∞ (unacknowledged)"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def _goal_ratio(value: float, goal: float, *, at_least: bool) -> tuple[str, bool]:
    return (f"≥ {goal:g}" if at_least else f"≤ {goal:g}"), (value >= goal if at_least else value <= goal)


def _command(args: argparse.Namespace, parts: set[int] | None = None) -> str:
    py = Path(sys.executable)
    shown = str(py.relative_to(ROOT)) if py.is_relative_to(ROOT) else str(py)
    opts = [f"--parts {','.join(map(str, sorted(parts or args.parts)))}", f"--devices {args.devices}",
            f"--records {args.records}", f"--batch {args.batch}", f"--inflight {args.inflight}",
            f"--latency-devices {args.latency_devices}", f"--rates {','.join(map(str, args.rates))}",
            f"--step-s {args.step_s}", f"--max-per-message {args.max_per_message}",
            f"--latency-db {args.latency_db}", f"--backlog {args.backlog}", f"--agent-db {args.agent_db}",
            f"--stall-s {args.stall_s}", f"--drain-s {args.drain_s}", f"--out {shlex.quote(str(args.out))}"]
    if args.broker_nodelay:
        opts.append("--broker-nodelay")
    if args.no_pg:
        opts.append("--no-pg")
    return f"{shown} -m bench.load " + " ".join(opts)


def _versions(pg: bool) -> str:
    import cryptography

    from protocol import identity

    parts = [f"Python {platform.python_version()}", f"{os.cpu_count()} CPUs",
             f"cryptography {cryptography.__version__}",
             f"VerifyKey.verify through {getattr(identity, 'LIBRARY', 'cryptography')}"]
    try:
        import nacl

        parts.append(f"PyNaCl {nacl.__version__}")
    except ImportError:
        parts.append("no PyNaCl")
    try:
        from sim.broker import mosquitto_binary

        out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5,
                             check=False)
        first = (out.stdout or out.stderr).splitlines()
        parts.append(first[0].strip() if first else "mosquitto")
    except (OSError, subprocess.SubprocessError, RuntimeError):
        parts.append("mosquitto ?")
    if pg:
        try:
            meter = Postgres()
            parts.append(f"PostgreSQL {meter.version()}")
            meter.close()
        except Exception as exc:  # noqa: BLE001 - report, the PostgreSQL parts will fail with the reason
            parts.append(f"PostgreSQL unreachable ({type(exc).__name__})")
    return ", ".join(parts)


# -- main --------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.report = Report(
            f"Set-up: {_versions(not args.no_pg)}; part 1/2: {args.devices} devices × {args.records} "
            f"records, batches of {args.batch}, {args.inflight} in flight each; part 3: "
            f"{args.latency_devices} devices, 1–{args.max_per_message} records a message, {args.step_s} s "
            f"a step ({args.latency_db}); "
            f"part 4: {args.backlog} records ({args.agent_db}).", _command(args))
        self.chains: list[tuple[Dongle, list[Record]]] | None = None
        self.sample: list[tuple[VerifyKey, Record]] = []       # the baseline's signatures
        self.ingests: dict[tuple[str, int], IngestResult] = {}

    def baseline(self) -> VerifyRates:
        if not self.sample:
            self.sample = [(d.key.public, r) for d, recs in chains(20, VERIFY_SAMPLE // 20) for r in recs]
        return verify_rates(self.sample)

    def _chains(self) -> list[tuple[Dongle, list[Record]]]:
        if self.chains is None:
            log(f"signing {self.args.devices} × {self.args.records} records")
            self.chains = chains(self.args.devices, self.args.records)
        return self.chains

    def ingest(self, kind: str, processes: int) -> IngestResult:
        if (kind, processes) not in self.ingests:
            log(f"ingest: {kind}, {processes} backend process(es)")
            result = ingest(kind, processes, self._chains(), self.args, self.tmp)
            self.ingests[kind, processes] = result
            label = f"{kind}, {processes} process{'es' if processes > 1 else ''}"
            extra = (f"; {result.gaps} acks that did not move `through` (a gap), {result.resends} "
                     f"resends from `through`, {result.stalls} after {self.args.stall_s} s without an ack"
                     if result.gaps or result.resends or result.stalls else "")
            self.report.notes.append(
                f"Ingest ({label}): {result.accepted} records in {result.elapsed:.1f} s; "
                f"{result.cpu.describe()}{extra}"
                + (f"; {result.rejected} rejections in the acks" if result.rejected else "")
                + f"; records handled, from /metrics: {result.counts}")
            if result.pg:
                self.report.notes.append(f"PostgreSQL ({label}), {result.pg}")
        return self.ingests[kind, processes]

    def part0(self) -> VerifyRates:
        rates = self.baseline()
        base = f"VerifyKey.verify {k(rates.protocol)}"
        self.report.add(Row("raw verify: `protocol.identity.VerifyKey.verify` (the baseline)",
                            k(rates.protocol), "—", None))
        self.report.add(Row("raw verify: `cryptography` `Ed25519PublicKey.verify`, key loaded once",
                            k(rates.cryptography), base, rates.cryptography / rates.protocol))
        if rates.nacl is not None:
            self.report.add(Row("raw verify: PyNaCl `VerifyKey.verify`, key loaded once", k(rates.nacl), base,
                                rates.nacl / rates.protocol))
        return rates

    def part1(self) -> None:
        for kind, goal in (("sqlite", 0.85), ("pg", 0.7)):
            if kind == "pg" and self.args.no_pg:
                continue
            base = self.baseline().protocol
            r = self.ingest(kind, 1)
            name = "SQLite" if kind == "sqlite" else "PostgreSQL"
            text, met = _goal_ratio(r.rate / base, goal, at_least=True)
            self.report.add(Row(f"1. ingest end to end, one `odo-backend run`, {name}",
                                f"{k(r.rate)} accepted", f"VerifyKey.verify {k(base)}", r.rate / base, text,
                                met))
            floor = 1000 / base
            self.report.add(Row(f"1. backend CPU per 1,000 records, {name}", f"{r.cpu_per_1k:.3f} s",
                                f"1,000 verifies {floor:.3f} s", r.cpu_per_1k / floor))

    def part2(self) -> None:
        if self.args.no_pg:
            self.report.notes.append("Part 2 skipped: --no-pg.")
            return
        one = self.ingest("pg", 1)
        two = self.ingest("pg", 2)
        text, met = _goal_ratio(two.rate / one.rate, 1.5, at_least=True)
        self.report.add(Row("2. ingest, two `odo-backend run` on one PostgreSQL", f"{k(two.rate)} accepted",
                            f"one process {k(one.rate)}", two.rate / one.rate, text, met))
        text, met = _goal_ratio(two.cpu_per_1k / one.cpu_per_1k, 1.10, at_least=False)
        self.report.add(Row("2. backend CPU per 1,000 records, two processes", f"{two.cpu_per_1k:.3f} s",
                            f"one process {one.cpu_per_1k:.3f} s", two.cpu_per_1k / one.cpu_per_1k, text,
                            met))
        if not met or two.rate / one.rate < 1.5:
            self.report.notes.append(self._where_the_core_went(one, two))

    @staticmethod
    def _where_the_core_went(one: IngestResult, two: IngestResult) -> str:
        c = two.cpu
        cores = os.cpu_count() or 1
        named = sorted(c.groups, key=lambda g: -c.groups[g])
        rest = max(0.0, c.machine - sum(c.groups.values())) / c.wall
        idle = max(0.0, cores - c.machine / c.wall)
        biggest = ", ".join(f"{g} {c.cores(g):.2f}" for g in named[:4])
        return (f"Two processes: of {cores} cores, {c.machine / c.wall:.2f} were busy ({idle:.2f} idle); "
                f"the largest users were {biggest}, and {rest:.2f} went to other processes on the machine. "
                f"One process used {one.cpu.machine / one.cpu.wall:.2f} cores in all.")

    def part3(self) -> None:
        if self.args.latency_db == "pg" and self.args.no_pg:
            self.report.notes.append("Part 3 skipped: --latency-db pg with --no-pg.")
            return
        base = self.baseline().protocol
        log(f"latency: {self.args.latency_devices} devices, offered rates {self.args.rates}")
        steps, rtt, _ = latency(self.args, self.tmp)
        held = 0
        for s in steps:
            self.report.add(Row(
                f"3. latency at {s.rate} rec/s offered ({s.achieved:.0f} published/s), "
                f"{self.args.latency_devices} devices",
                f"p50 {ms(s.p50)}, p99 {ms(s.p99)}", f"mosquitto round trip {ms(rtt)}",
                s.p99 / rtt if s.p99 != float("inf") else None, f"p99 ≤ {P99_GOAL_S:g} s", s.held))
            self.report.notes.append(
                f"Latency at {s.rate} rec/s: {s.records} records, {s.lost} unacknowledged "
                f"{self.args.drain_s} s after the step"
                + (f" (mosquitto warned {s.drops} times that it dropped messages: a client's queue was "
                   "full)" if s.drops else "") + "; "
                f"the generator published at most {ms(s.lag_p99)} behind its schedule (p99) using "
                f"{s.cpu.cores('load generator'):.2f} cores; {s.cpu.describe()}; from /metrics: {s.handled}")
            if s.held:
                held = s.rate
        self.report.add(Row(
            "3. highest offered rate held with p99 ≤ 1 s", f"{held} rec/s" if held else "none of the steps",
            f"VerifyKey.verify {k(base)}", held / base if held else None,
            "—", None))

    def part4(self) -> None:
        kind = self.args.agent_db
        if kind == "pg" and self.args.no_pg:
            self.report.notes.append("Part 4 skipped: --agent-db pg with --no-pg.")
            return
        one = self.ingest(kind, 1)
        log(f"drain: one agent, {self.args.backlog} records")
        r = drain(self.args, self.tmp)
        floor = r.backlog / one.rate
        text, met = _goal_ratio(r.elapsed / floor, 1.25, at_least=False)
        name = "SQLite" if kind == "sqlite" else "PostgreSQL"
        self.report.add(Row(f"4. drain of one `odo-agent run`'s {r.backlog}-record backlog, {name}",
                            f"{r.elapsed:.1f} s ({k(r.backlog / r.elapsed)})",
                            f"{r.backlog} ÷ part 1's {k(one.rate)} = {floor:.1f} s", r.elapsed / floor,
                            text, met))
        self.report.notes.append(f"Drain: {r.batches} acks; {r.cpu.describe()}; "
                                 f"the agent: `{r.agent_command}`")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--parts", type=_int_list(1, 4, 4), default=[1, 2, 3, 4],
                    help="which parts (default 1,2,3,4)")
    ap.add_argument("--devices", type=_bounded(1, 10_000), default=100, help="parts 1 and 2")
    ap.add_argument("--records", type=_bounded(1, 100_000), default=400, help="per device, parts 1 and 2")
    ap.add_argument("--batch", type=_bounded(1, messages.MAX_BATCH_RECORDS), default=200,
                    help="records a batch, parts 1 and 2")
    ap.add_argument("--inflight", type=_bounded(1, 64), default=2, help="batches in flight per device")
    ap.add_argument("--latency-devices", type=_bounded(1, 100_000), default=1000, help="part 3")
    ap.add_argument("--rates", type=_int_list(1, 1_000_000, 16), default=[500, 1000, 1500, 2000, 3000, 4000],
                    help="offered records per second, increasing (part 3)")
    ap.add_argument("--step-s", type=_bounded(1, 600), default=4, help="seconds a rate is offered")
    ap.add_argument("--max-per-message", type=_bounded(1, messages.MAX_BATCH_RECORDS), default=10,
                    help="a message holds 1 to this many records (part 3)")
    ap.add_argument("--latency-db", choices=("sqlite", "pg"), default="sqlite", help="part 3's database")
    ap.add_argument("--backlog", type=_bounded(1, 1_000_000), default=100_000, help="part 4")
    ap.add_argument("--agent-db", choices=("sqlite", "pg"), default="sqlite", help="part 4's database")
    ap.add_argument("--stall-s", type=_bounded(5, 3600), default=120,
                    help="send again after so long without an ack; give up after twice that")
    ap.add_argument("--drain-s", type=_bounded(1, 600), default=5,
                    help="how long after a step the acks are waited for")
    ap.add_argument("--broker-nodelay", action="store_true",
                    help="mosquitto with set_tcp_nodelay true (deploy/mosquitto does not set it)")
    ap.add_argument("--no-pg", action="store_true", help="without $ODO_TEST_PG (skips part 2)")
    ap.add_argument("--out", type=Path, default=Path("bench-results.md"),
                    help="where the table is written too")
    args = ap.parse_args(argv)
    args.parts = set(args.parts)
    if args.devices * args.records > 2_000_000:
        ap.error(f"--devices × --records is {args.devices * args.records}: at most 2,000,000 records")
    if len(str(args.out)) > 4096:
        ap.error("--out: path longer than 4096 characters")
    probe = Dongle()
    sizes = [len(next_record(probe).jws) for _ in range(20)]
    if not messages.batch_fits(["x" * max(sizes)] * args.batch):
        ap.error(f"--batch {args.batch}: {args.batch} records of up to {max(sizes)} bytes exceed "
                 f"a batch's {messages.MAX_BATCH_BYTES} bytes")
    warnings.simplefilter("ignore", ResourceWarning)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="odo-bench-load-") as tmp:
        bench = Bench(args, Path(tmp))
        log(bench.report.setup)
        bench.part0()
        for part, run in ((1, bench.part1), (2, bench.part2), (3, bench.part3), (4, bench.part4)):
            if part in args.parts:
                run()
    commands = [c for r in bench.ingests.values() for c in r.commands]
    if commands:
        bench.report.notes.append("Backends started as: " + "; ".join(f"`{c}`" for c in commands))
    if len(args.parts) > 1:
        bench.report.notes.append("Each part alone (a part needing a figure of part 1 measures it too): "
                                  + "; ".join(f"{n}: `{_command(args, {n})}`" for n in sorted(args.parts)))
    bench.report.notes.append(f"The whole run took {time.monotonic() - started:.0f} s.")
    text = bench.report.markdown()
    print(text, end="")
    args.out.write_text(text)
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
