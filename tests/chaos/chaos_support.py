"""The chaos run's parts: what it does (:class:`Plan`), what it did (:class:`Counts`), the faults
themselves (:class:`Chaos`, one thread per kind of fault), and the probes that pick their moments
and check the outcome.

- :class:`PgWatch` looks into PostgreSQL (``pg_stat_activity``, ``pg_locks``) for a backend
  process in the middle of a device's batch (it holds the device's lock and has written), and
  holds a queued log entry's row so that a sequencer integrating it waits inside its transaction,
  so that a SIGKILL lands mid-batch or mid-integration, not between them. A PostgreSQL session is
  tied to an ``odo-backend`` process (or one of its ingest processes) by its client port
  (:func:`pg_client_ports`, from ``/proc``).
- :func:`outbox_progress` and :func:`outbox_records` read an agent's outbox (agent/buffer.py).
- :class:`HttpLog` reads the transparency log as any client does: ``/log/checkpoint`` and the
  tiles (c2sp.org/tlog-tiles), for the consistency and inclusion proofs.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from agent.buffer import Outbox, Stored
from backend.locks import device_lock_key
from backend.transparency import translog
from protocol import tiles
from sim.processes import descendants
from sim.stack import Car, Proc, Stack, free_port

PG_PORT = 5432
#: the sequencer's advisory lock as pg_locks shows a one-bigint key: (classid, objid) = (high, low)
_LOCK_CLASSID, _LOCK_OBJID = translog.LOCK >> 32, translog.LOCK & 0xFFFFFFFF


@dataclass(frozen=True)
class Plan:
    """A simulated week: each of ``days`` is one drive and one park of every car; the faults come at
    seeded random moments of it."""

    cars: int
    days: int
    drive_s: float
    park_s: float
    agent_kills: int
    broker_restarts: int
    backend_kills: int
    sequencer_kills: int
    confirmations_per_car: int = 2

    @property
    def week_s(self) -> float:
        return self.days * (self.drive_s + self.park_s)


@dataclass
class Counts:
    """What the run did; ``str()`` is the line the test prints and puts in its assertion messages."""

    seed: int
    agent_kills: int = 0
    broker_restarts: int = 0
    backend_kills: int = 0            # SIGKILLs of an odo-backend in the middle of a device's batch
    backend_kills_idle: int = 0       # ... that caught none in time (not counted above)
    sequencer_kills: int = 0          # SIGKILLs of the sequencer while it integrated queued entries
    confirmations: int = 0
    records: int = 0
    rewards: int = 0
    checkpoints_verified: int = 0     # the stored ones, then those served over HTTP during the run
    checkpoints_served: int = 0
    log_size: int = 0
    statements: Counter[str] = field(default_factory=Counter)   # what the killed backends were writing

    def __str__(self) -> str:
        hit = ", ".join(f"{k} {v}" for k, v in self.statements.most_common())
        return (f"seed {self.seed}: agent kills {self.agent_kills}, broker restarts {self.broker_restarts}, "
                f"backend kills mid-batch {self.backend_kills} (+{self.backend_kills_idle} not caught in a "
                f"batch), sequencer kills {self.sequencer_kills}, confirmations {self.confirmations}, "
                f"records {self.records}, rewards {self.rewards}, checkpoints verified "
                f"{self.checkpoints_verified} ({self.checkpoints_served} of them as served), log size "
                f"{self.log_size}; statements in flight at the kills: {hit or '-'}")


# -- PostgreSQL, seen from outside ---------------------------------------------------------------


def pg_client_ports(pids: list[int]) -> dict[int, int]:
    """The local ports of the connections to PostgreSQL that processes ``pids`` hold, to their pid."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    ports: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[9] in inodes and int(f[2].rsplit(":", 1)[1], 16) == PG_PORT:
                ports[int(f[1].rsplit(":", 1)[1], 16)] = inodes[f[9]]
    return ports


class PgWatch:
    """A connection of its own to the backend's PostgreSQL server, looking at the other sessions."""

    def __init__(self, db_url: str) -> None:
        self.base, _, query = db_url.partition("?")
        self.schema = dict(p.split("=", 1) for p in query.split("&") if p).get("schema", "public")
        self.conn = psycopg.connect(self.base, autocommit=True)

    def close(self) -> None:
        self.conn.close()

    def in_batch(self, pids: list[int], devs: list[str], *, commit: bool) -> tuple[int, str] | None:
        """(pid, statement) of one of ``pids`` in the middle of a batch of one of ``devs``: it holds
        the device's lock (:func:`backend.locks.lock_device`) in a transaction that has written (it
        has a transaction id), and is committing it only with ``commit``; None if none is."""
        rows = self.conn.execute(
            "SELECT a.client_port, a.query FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "WHERE a.backend_xid IS NOT NULL AND a.datname = current_database() "
            "AND a.client_port IS NOT NULL AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.classid::bigint * 4294967296 + l.objid::bigint = ANY(%s::bigint[]) "
            "AND (%s OR a.query <> 'COMMIT')", ([device_lock_key(d) for d in devs], commit)).fetchall()
        return self._mine(rows, pids)

    def stall_integration(self, pids: list[int], timeout_s: float,
                          kill: Callable[[int], None]) -> tuple[int, str] | None:
        """Hold the oldest queued log entry's row (``FOR UPDATE``, on a connection of its own) until
        one of ``pids`` is seen integrating the batch that holds it: inside its transaction, holding
        the log's sequencer lock, its new leaves written, waiting on that row to delete the entries
        it integrated. ``kill`` that pid then, while it waits, and return (pid, statement); None
        when no entry was queued or no sequencer of ``pids`` came within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(self.base, autocommit=True) as holder:
            me = int(holder.info.backend_pid)
            while time.monotonic() < deadline:
                with holder.transaction():
                    holder.execute("SET LOCAL lock_timeout = '2s'")
                    held = holder.execute(f'SELECT id FROM "{self.schema}".translog_queue ORDER BY id '
                                          "LIMIT 1 FOR UPDATE").fetchone()
                    while held is not None and time.monotonic() < deadline:
                        rows = self.conn.execute(
                            "SELECT a.client_port, a.query FROM pg_locks l JOIN pg_stat_activity a "
                            "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s "
                            "AND l.objid = %s AND l.objsubid = 1 AND a.datname = current_database() "
                            "AND %s = ANY(pg_blocking_pids(a.pid)) "
                            "AND a.query LIKE 'DELETE FROM translog_queue%%'",
                            (_LOCK_CLASSID, _LOCK_OBJID, me)).fetchall()
                        hit = self._mine(rows, pids)
                        if hit is not None:
                            kill(hit[0])
                            return hit
                        time.sleep(0.01)
                time.sleep(0.05)         # nothing queued: in a moment
        return None

    @staticmethod
    def _mine(rows: list[tuple[Any, ...]], pids: list[int]) -> tuple[int, str] | None:
        """The first row whose session is held by one of ``pids`` or a process under it (a
        backend's ingest processes hold its batches' sessions), as (that one of ``pids``, statement)."""
        if not rows:
            return None
        family = family_of(pids)
        ports = pg_client_ports(list(family))
        for port, query in rows:
            if int(port) in ports:
                return family[ports[int(port)]], " ".join(str(query).split()[:3])
        return None


def family_of(pids: list[int]) -> dict[int, int]:
    """Each of ``pids`` and every process under it, to the one of ``pids`` it is under."""
    return {kid: pid for pid in pids for kid in (pid, *descendants(pid))}


# -- the agents' outboxes -----------------------------------------------------------------------


def outbox_progress(car: Car) -> tuple[int, int]:
    """(last seq, unsynced records) of the car's outbox, read beside a running agent."""
    conn = sqlite3.connect(car.state_dir / "outbox.db", timeout=10)
    try:
        row = conn.execute("SELECT COALESCE(MAX(seq), 0), COALESCE(SUM(synced = 0), 0) "
                           "FROM records").fetchone()
        return int(row[0]), int(row[1])
    finally:
        conn.close()


def outbox_records(car: Car) -> list[Stored]:
    """Every record of the car's outbox (its agent stopped), by seq."""
    outbox = Outbox.open(car.state_dir / "outbox.db")
    try:
        return outbox.records(0, limit=10_000_000)
    finally:
        outbox.close()


def _adapter_opens(car: Car) -> int:
    """How many times the car's agents have opened the OBD adapter (from their log)."""
    log = car.state_dir.parent / "logs" / f"agent-{car.name}.log"
    return log.read_text(errors="replace").count("OBD adapter open") if log.exists() else 0


# -- the log over HTTP ----------------------------------------------------------------------------


class HttpLog:
    """The transparency log at ``base`` (``http://host:port``), as a client reads it."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/") + "/log"

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.base}/{path}", timeout=10) as r:
            data: bytes = r.read()
        return data

    def checkpoint(self) -> bytes:
        return self._get("checkpoint")

    def tree(self, size: int) -> tiles.TileTree:
        def fetch(level: int, n: int, width: int) -> bytes:
            return self._get(tiles.path(level, n, None if width == tiles.WIDTH else width))

        return tiles.TileTree(size, fetch)

    def entries(self, size: int) -> list[bytes]:
        out: list[bytes] = []
        for n in range(-(-size // tiles.WIDTH)):
            width = min(tiles.WIDTH, size - n * tiles.WIDTH)
            path = tiles.path(None, n, None if width == tiles.WIDTH else width)
            out += tiles.decode_bundle(self._get(path), width)
        return out


# -- the faults -----------------------------------------------------------------------------------


class Chaos:
    """Runs the plan's faults against a started stack, each kind in a thread of its own, for
    ``plan.week_s`` seconds (longer only to reach a count that needs a particular moment, e.g. a
    kill inside a transaction), and leaves every process running again.

    The stack's main backend (``Stack.backend``) and a second one (``second_port``, client id
    ``second_id``) share the load; at most one of them is down at a time."""

    def __init__(self, stack: Stack, plan: Plan, counts: Counts, db_url: str, *, second_id: str) -> None:
        self.stack, self.plan, self.counts = stack, plan, counts
        self.rng = random.Random(counts.seed)
        self.watch = PgWatch(db_url)
        self.second_id = second_id
        self.second_port = free_port()
        self.second: Proc | None = None
        self.served: list[bytes] = []          # checkpoints the backends served during the run
        self.journal = stack.logs / "chaos.log"      # each fault, when it came
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = 0.0
        self._restarting: threading.Thread | None = None

    # -- the backends -------------------------------------------------------------------------

    def start_second(self) -> None:
        self.second = self.stack.start_backend(http_port=self.second_port, client_id=self.second_id)

    def backends(self) -> dict[str, Proc]:
        running = {"main": self.stack.backend, "second": self.second}
        return {name: p for name, p in running.items() if p is not None}

    def _restart(self, name: str, after_s: float = 0.0) -> None:
        time.sleep(after_s)
        if name == "main":
            self.stack.start_backend()
        else:
            self.start_second()

    def api_bases(self) -> list[str]:
        bases = []
        if self.stack.backend is not None:
            bases.append(self.stack.api_url)
        if self.second is not None:
            bases.append(f"http://127.0.0.1:{self.second_port}")
        return bases

    # -- running --------------------------------------------------------------------------------

    def run(self) -> None:
        """The week of faults; raises AssertionError naming what failed in a thread."""
        self._start = time.monotonic()
        seeds = [self.rng.randrange(2**32) for _ in range(self.plan.cars + 4)]
        threads = [threading.Thread(target=self._guard, args=(self._agents, car, random.Random(seeds[i])),
                                    name=f"chaos-{car.name}") for i, car in enumerate(self.stack.cars)]
        threads += [threading.Thread(target=self._guard, args=(fn, None, random.Random(seeds[-k - 1])),
                                     name=f"chaos-{fn.__name__}")
                    for k, fn in enumerate((self._broker, self._backend, self._confirm, self._monitor))]
        for t in threads:
            t.start()
        for t in threads[:-1]:
            t.join()
        self._stop.set()
        threads[-1].join()
        self.watch.close()
        if self.errors:
            raise AssertionError(f"the chaos threads failed ({self.counts}):\n" + "\n".join(self.errors))

    def _guard(self, fn: Callable[[Car | None, random.Random], None], car: Car | None,
               rng: random.Random) -> None:
        try:
            fn(car, rng)
        except Exception:  # noqa: BLE001 - reported by run(), in the test's thread
            with self._lock:
                self.errors.append(traceback.format_exc())
            self._stop.set()

    def _moments(self, rng: random.Random, n: int, start: float = 0.0, end: float = 1.0) -> list[float]:
        """``n`` random moments of the part ``start``..``end`` of the week (fractions of it), in
        seconds from its start, in order: one in each of ``n`` equal slots, so that faults that take
        a while each (a backend's restart) keep up with the week."""
        slot = (end - start) * self.plan.week_s / max(n, 1)
        return [start * self.plan.week_s + (i + rng.random()) * slot for i in range(n)]

    def _until(self, at: float) -> bool:
        """Sleep until ``at`` seconds into the week; False when the run is being stopped."""
        return not self._stop.wait(max(0.0, self._start + at - time.monotonic()))

    def _count(self, name: str, what: str) -> None:
        """One more fault of ``name``, noted in the journal."""
        with self._lock:
            setattr(self.counts, name, getattr(self.counts, name) + 1)
        self._note(what)

    def _note(self, what: str) -> None:
        with self._lock, open(self.journal, "a") as out:
            out.write(f"{time.monotonic() - self._start:8.2f} {what}\n")

    # -- the agents: SIGKILL at random moments, restarted after a short power cut ------------

    def _agents(self, car: Car | None, rng: random.Random) -> None:
        assert car is not None
        per_car = -(-self.plan.agent_kills // self.plan.cars)
        for at in self._moments(rng, per_car):
            if not self._until(at):
                return
            self.stack.stop_agent(car, kill=True)
            self._count("agent_kills", f"agent {car.name} killed")
            time.sleep(rng.uniform(0.0, 0.5))
            opened = _adapter_opens(car)
            self.stack.start_agent(car)
            self._wait_recording(car, opened, rng)

    def _wait_recording(self, car: Car, opened: int, rng: random.Random) -> None:
        """Until the agent just started has opened its adapter (``opened`` times before) and had a
        moment to record; or 10 s, should the adapter not open (the kill lands all the same)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _adapter_opens(car) <= opened:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))

    # -- mosquitto: killed or stopped, down a moment, back on the same port ------------------

    def _broker(self, car: Car | None, rng: random.Random) -> None:
        for at in self._moments(rng, self.plan.broker_restarts, end=0.95):
            if not self._until(at):
                return
            assert self.stack.broker is not None
            self.stack.stop_process(self.stack.broker, kill=rng.random() < 0.5)
            time.sleep(rng.uniform(0.2, 2.0))
            self.stack.start_broker()
            self._count("broker_restarts", "broker restarted")

    # -- the backends: SIGKILL mid-batch, and the sequencer mid-integration ------------------

    def _backend(self, car: Car | None, rng: random.Random) -> None:
        events = [(at, "batch") for at in self._moments(rng, self.plan.backend_kills, end=0.9)]
        events += [(at, "sequencer") for at in self._moments(rng, self.plan.sequencer_kills, 0.2, 0.8)]
        try:
            for at, kind in sorted(events):
                if not self._until(at):
                    return
                self._kill_backend(rng, sequencer=kind == "sequencer")
            deadline = self._start + self.plan.week_s + 20
            while (self.counts.backend_kills < self.plan.backend_kills
                   or self.counts.sequencer_kills < self.plan.sequencer_kills):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                self._kill_backend(rng, sequencer=self.counts.sequencer_kills < self.plan.sequencer_kills)
        finally:
            self._restarted()

    def _restarted(self) -> None:
        """Wait for the backend killed last to be back (it restarts in a thread of its own)."""
        if self._restarting is not None:
            self._restarting.join()
            self._restarting = None

    def _kill_backend(self, rng: random.Random, *, sequencer: bool) -> None:
        """SIGKILL a backend in the middle of a device's batch (most times before its COMMIT), or
        with ``sequencer`` the one integrating queued entries into the log, and bring it back after
        a moment; at most one is down at a time."""
        self._restarted()
        running = self.backends()
        by_pid = {p.pid: name for name, p in running.items()}
        killed: list[str] = []

        def kill(pid: int) -> None:
            killed.append(by_pid[pid])
            self.stack.stop_process(running[by_pid[pid]], kill=True)

        began = time.monotonic()
        if sequencer:
            hit = self.watch.stall_integration(list(by_pid), 5.0, kill)
            if hit is None:
                self._note(f"no sequencer caught integrating in {time.monotonic() - began:.2f} s")
                return                   # tried again later
        else:
            pid = running[rng.choice(sorted(running))].pid
            devs = [car.dev for car in self.stack.cars]
            commit = rng.random() < 0.3
            hit = None
            while hit is None and time.monotonic() < began + 8 and not self._stop.is_set():
                hit = self.watch.in_batch([pid], devs, commit=commit)
                if hit is None:
                    time.sleep(0.002)
            kill(pid)
        victim = killed[0]
        if victim == "second":
            self.second = None
        waited = f"after {time.monotonic() - began:.2f} s"
        if hit is None:
            self._count("backend_kills_idle", f"backend {victim} killed, no batch caught {waited}")
        else:
            with self._lock:
                self.counts.statements[hit[1]] += 1
            self._count("sequencer_kills" if sequencer else "backend_kills",
                        f"backend {victim} killed {'integrating' if sequencer else 'mid-batch'} {waited}: "
                        f"{hit[1]}")
        down = rng.uniform(0.2, 1.0)
        self._restarting = threading.Thread(target=self._guard, name="chaos-restart",
                                            args=(lambda _car, _rng: self._restart(victim, down), None, rng))
        self._restarting.start()

    # -- the drivers confirm their mileage, twice a week (credited once) ---------------------

    def _confirm(self, car: Car | None, rng: random.Random) -> None:
        todo = sorted((at, c) for c in self.stack.cars
                      for at in self._moments(rng, self.plan.confirmations_per_car, 0.1, 0.9))
        for at, c in todo:
            if not self._until(at):
                return
            for _ in range(10):
                done = self.stack.agent_cli(c, "confirm", "--yes", timeout=60)
                if done.returncode == 0:
                    self._count("confirmations", f"{c.name}: {done.stdout.strip()}")
                    break
                time.sleep(1.0)          # no odometer figure yet, or the outbox busy: again
            else:
                raise AssertionError(f"odo-agent confirm ({c.name}) failed 10 times: {done.stderr}")

    # -- the checkpoints the backends serve meanwhile ----------------------------------------

    def _monitor(self, car: Car | None, rng: random.Random) -> None:
        while not self._stop.wait(rng.uniform(0.5, 1.5)):
            bases = self.api_bases()
            if not bases:
                continue
            try:
                note = HttpLog(rng.choice(bases)).checkpoint()
            except (urllib.error.URLError, OSError):
                continue                 # that backend was just killed
            with self._lock:
                self.served.append(note)
