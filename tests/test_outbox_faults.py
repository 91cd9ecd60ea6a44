"""Power cuts on the agent's outbox: the writer SIGKILLed at random moments, its files frozen
mid-write and opened as after a reboot, torn WAL and database files; and the files' modes.

After each fault the outbox must open as the agent opens it after a reboot and hold a valid
chain: every record verifies under the device key, seqs run gap-free from genesis or from the
retained base (the first record pruning kept, whose ``prev`` is the id of the one before), the
tip is the last record, every record the writer reported stored (``append`` returned) and every
ack it reported applied are still there, nothing already signed changed, and the agent,
restarted on the file, signs seq tip + 1 with ``prev`` = the tip's id under the same key. A torn
file may instead be refused, with a :class:`StorageError` that names it and its problem.

The counts are bounded for CI (~30 s in all); ``ODO_FAULTS_LONG=1`` raises them, and
``ODO_FAULTS_KILLS`` / ``ODO_FAULTS_SNAPSHOTS`` set them exactly. ``pytest -s`` prints what each
test did; the assertion messages carry the same figures.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

from agent import identity
from agent.buffer import Outbox
from agent.clock import Clock
from agent.errors import StorageError
from agent.recorder import Recorder
from agent.state import ACK, VEHICLE, Tip, writes
from common.clock import now_ms
from protocol import records
from protocol.identity import VerifyKey
from protocol.messages import Ack
from protocol.records import GENESIS
from tests.fakes import FakeReading

LONG = os.environ.get("ODO_FAULTS_LONG") == "1"


def _count(name: str, short: int, long: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return long if LONG else short
    if not re.fullmatch(r"[1-9][0-9]{0,5}", raw):
        raise ValueError(f"{name}={raw!r}: expected a whole number from 1 to 999999")
    return int(raw)


KILLS = _count("ODO_FAULTS_KILLS", 150, 2000)
SNAPSHOTS = _count("ODO_FAULTS_SNAPSHOTS", 60, 600)
MAX_RECORDS = 120          # the writer's pruning cap: small, so that deletes run often
ODO = FakeReading("odometer", {"odo_m": 1000, "src": "obd"})
OUTBOX = "outbox.db"


# -- the writer: a forked child that writes as the daemon does, and says what it stored ----------

def _say(out: int, line: str) -> None:
    os.write(out, (line + "\n").encode("ascii"))  # one write < PIPE_BUF: a line is never torn


def _writer(state_dir: Path, out: int, seed: int) -> NoReturn:
    """Append records, apply acks, prune, save state, until killed; report each one done."""
    code = 0
    try:
        rng = random.Random(seed)
        box = Outbox.open(state_dir / OUTBOX)
        rec = Recorder(box, identity.load(state_dir), clock=Clock("synced"), boot=f"boot-{seed}",
                       max_records=10**6)
        _say(out, "ready")
        while True:
            r = rng.random()
            if r < 0.15:
                tip = box.tip()[0]
                through = rng.randint(max(0, tip - 5), tip)
                box.apply_ack(Ack(through, (), through * 10), now_ms())
                _say(out, f"ack {through}")
            elif r < 0.22:
                box.prune(now_ms(), retention_ms=60_000, max_records=MAX_RECORDS)
                _say(out, "prune")
            elif r < 0.27:
                VEHICLE.put(box, {"n": rng.randrange(10**6)})
            else:
                readings = [ODO] * rng.randint(1, 3)
                if rng.random() < 0.2:  # a record over several pages
                    note = {"event": "note", "detail": "x" * rng.randint(1, 9000)}
                    readings.append(FakeReading("event", note))
                for done in rec.record(readings, writes(VEHICLE.entry({"n": rng.randrange(10**6)}))):
                    _say(out, f"rec {done.seq} {done.id} {done.prev}")
                if rec.error is not None:
                    raise RuntimeError(rec.error)
    except BaseException as exc:  # noqa: BLE001  # the child must never return into pytest
        _say(out, f"error {exc!r}"[:500])
        code = 1
    finally:
        os._exit(code)


def _spawn(state_dir: Path, seed: int) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _writer(state_dir, w, seed)
    os.close(w)
    return pid, r


def _drain(fd: int) -> list[str]:
    """What the writer said so far (it is dead or stopped)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("ascii").splitlines()


# -- what the writers reported, and the checks ------------------------------------------------------

@dataclass
class Ledger:
    """Every record id seen (reported or read back), what was reported stored, the acks."""

    key: VerifyKey
    ids: dict[int, str] = field(default_factory=dict)
    prevs: dict[int, str] = field(default_factory=dict)
    jws: dict[int, str] = field(default_factory=dict)
    stored: dict[int, str] = field(default_factory=dict)
    acked: int = 0
    said: Counter[str] = field(default_factory=Counter)

    def take(self, lines: list[str]) -> list[tuple[int, str, str]]:
        """Note the writer's lines; the records it reported, in order."""
        recs = []
        for line in lines:
            word, *rest = line.split(" ")
            self.said[word] += 1
            assert word != "error", f"the writer failed: {line}"
            if word == "rec":
                seq, rid, prev = int(rest[0]), rest[1], rest[2]
                assert self.ids.setdefault(seq, rid) == rid, f"seq {seq} signed twice, differently"
                assert prev == (GENESIS if seq == 1 else self.ids.get(seq - 1, prev)), \
                    f"seq {seq}: prev {prev} is not the id of seq {seq - 1}"
                self.stored[seq] = rid
                recs.append((seq, rid, prev))
            elif word == "ack":
                self.acked = max(self.acked, int(rest[0]))
        return recs


def _check(path: Path, ledger: Ledger, *, complete: bool, where: str) -> Tip:
    """Open ``path`` as the agent does after a reboot; check its chain against the ledger.

    ``complete``: also nothing reported stored or acked is missing (a file as the disk holds it
    after a power cut; a torn one may have lost its tail, and only has to be a valid chain)."""
    box = Outbox.open(path)
    try:
        assert box._read("PRAGMA integrity_check")[0][0] == "ok", where
        rows = box.records(0, limit=10**7)
        tip = Tip(*box.tip())
        ack = ACK.get(box)
    finally:
        box.close()
    through = ack.through if ack is not None else 0
    seqs = [r.seq for r in rows]
    base = seqs[0] if seqs else tip.seq + 1
    assert seqs == list(range(base, tip.seq + 1)), f"{where}: seqs {base}..{tip.seq} have gaps"
    prev = GENESIS if base == 1 else ledger.ids[base - 1]
    for row in rows:
        if ledger.jws.get(row.seq) != row.jws:
            assert row.seq not in ledger.jws, f"{where}: the stored record {row.seq} changed"
            rec = records.verify(row.jws, ledger.key)
            assert (rec.seq, rec.id) == (row.seq, row.id), where
            ledger.jws[row.seq], ledger.prevs[row.seq] = row.jws, rec.prev
        assert ledger.ids.setdefault(row.seq, row.id) == row.id, f"{where}: seq {row.seq} re-signed"
        assert ledger.prevs[row.seq] == prev, f"{where}: seq {row.seq} does not follow seq {row.seq - 1}"
        assert row.synced == (row.seq <= through), \
            f"{where}: seq {row.seq} synced={row.synced}, ack through {through}"
        prev = row.id
    if rows:
        assert tip.id == rows[-1].id, f"{where}: the tip is not the last record"
    if complete:
        have = {row.seq: row.id for row in rows}
        lost = [s for s, rid in ledger.stored.items()
                if have.get(s) != rid and not (s < base and s <= through)]  # pruned once acked
        assert lost == [], f"{where}: records reported stored are gone (tip {tip.seq}, base {base})"
        assert through >= ledger.acked, f"{where}: ack {ledger.acked} was applied, the file has {through}"
    return tip


def _restart(state_dir: Path, ledger: Ledger, tip: Tip, where: str) -> None:
    """The agent, restarted on the file, continues the chain with the same key."""
    box = Outbox.open(state_dir / OUTBOX)
    try:
        rec = Recorder(box, identity.load(state_dir), clock=Clock("synced"), boot="after-reboot")
        (new,) = rec.record([ODO])
    finally:
        box.close()
    assert (new.seq, new.prev) == (tip.seq + 1, tip.id), f"{where}: restarted at {new.seq} after {tip}"
    records.verify(new.jws, ledger.key)


def _device(state_dir: Path) -> Ledger:
    return Ledger(identity.create(state_dir).public)


# -- (a) SIGKILL at random moments ------------------------------------------------------------------

def test_writer_killed_at_random_moments_leaves_a_valid_outbox(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ledger = _device(state)
    rng = random.Random(4711)
    tip = Tip()
    runs: Counter[str] = Counter()
    unreported = 0
    started = time.monotonic()
    for kill in range(KILLS):
        pid, fd = _spawn(state, kill)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        lines = _drain(fd)
        os.close(fd)
        recs = ledger.take(lines)
        assert os.WIFSIGNALED(status), f"kill {kill}: the writer ended by itself: {lines[-1:]}"
        runs["before ready" if "ready" not in lines else "wrote" if recs else "ready, no record"] += 1
        where = f"after kill {kill + 1} of {KILLS}"
        if recs:
            assert recs[0][0::2] == (tip.seq + 1, tip.id), f"{where}: did not continue the chain at {tip}"
        before = tip.seq
        tip = _check(state / OUTBOX, ledger, complete=True, where=where)
        unreported += tip.seq - max([before, *(s for s, _, _ in recs)])
    _restart(state, ledger, tip, f"after {KILLS} kills")
    figures = (f"{KILLS} SIGKILLs in {time.monotonic() - started:.1f} s: {dict(runs)}; "
               f"{tip.seq} records, {ledger.said['ack']} acks, {ledger.said['prune']} prunes reported; "
               f"{unreported} records committed but killed before reporting")
    print(figures)
    assert runs["wrote"] >= KILLS // 4, figures


# -- (b) the files frozen mid-write, as the disk holds them at a power cut -------------------------

def _copy(src: Path, dst: Path) -> Path:
    """The state directory as a reboot finds it: the key, the database, its WAL (the -shm is
    memory, rebuilt from the WAL)."""
    dst.mkdir()
    for name in (identity.KEY_FILE, OUTBOX, OUTBOX + "-wal"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def _cut(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    at = rng.randrange(1, size) if size > 1 else size
    os.truncate(path, at)
    return f"{path.name} cut at {at} of {size}"


def _torn(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    at = rng.randrange(size) if size else 0
    end = min(size, (at // 4096 + 1) * 4096)
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(rng.randbytes(end - at))
    return f"{path.name} bytes {at}..{end} of {size} garbled"


def _damaged(snap: Path, dst: Path, ledger: Ledger, rng: random.Random, outcomes: Counter[str]) -> None:
    """Torn copies of the frozen files: recovered to a valid chain, or refused naming the file."""
    for kind, name, damage in (("WAL cut", OUTBOX + "-wal", _cut), ("WAL torn", OUTBOX + "-wal", _torn),
                               ("database cut", OUTBOX, _cut)):
        if not (snap / name).exists():
            continue
        copy = _copy(snap, dst / kind.replace(" ", "-"))
        what = damage(copy / name, rng)
        where = f"{dst.name}, {what}"
        try:
            # a cut database file either loses nothing (its missing pages are in the WAL) or is refused
            tip = _check(copy / OUTBOX, ledger, complete=kind == "database cut", where=where)
        except StorageError as exc:
            named = str(copy / OUTBOX) in str(exc)
            assert named and re.search(r"damaged|malformed|not a database", str(exc)), \
                f"{where}: unclear error {exc}"
            outcomes[f"{kind}: refused"] += 1
        else:
            _restart(copy, ledger, tip, where)
            outcomes[f"{kind}: recovered"] += 1


def test_files_frozen_mid_write_open_as_after_a_power_cut(tmp_path: Path) -> None:
    live = tmp_path / "live"
    ledger = _device(live)
    rng = random.Random(1122)
    pid, fd = _spawn(live, 1)
    os.set_blocking(fd, False)
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    try:
        for shot in range(SNAPSHOTS):
            time.sleep(rng.uniform(0, 0.02))
            os.kill(pid, signal.SIGSTOP)
            os.waitpid(pid, os.WUNTRACED)
            lines = _drain(fd)
            snap = _copy(live, tmp_path / f"snap{shot}")
            os.kill(pid, signal.SIGCONT)
            ledger.take(lines)
            where = f"snapshot {shot + 1} of {SNAPSHOTS}"
            dst = tmp_path / f"torn{shot}"
            dst.mkdir()
            _damaged(snap, dst, ledger, rng, outcomes)
            tip = _check(snap / OUTBOX, ledger, complete=True, where=where)
            _restart(snap, ledger, tip, where)
            outcomes["frozen: complete"] += 1
            shutil.rmtree(snap)
            shutil.rmtree(dst)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    figures = (f"{SNAPSHOTS} snapshots in {time.monotonic() - started:.1f} s, writer at seq "
               f"{max(ledger.stored, default=0)} ({ledger.said['ack']} acks, {ledger.said['prune']} prunes): "
               f"{dict(sorted(outcomes.items()))}")
    print(figures)
    assert outcomes["frozen: complete"] == SNAPSHOTS and max(ledger.stored, default=0) >= SNAPSHOTS, figures


def test_a_torn_outbox_is_refused_with_the_file_and_the_problem(tmp_path: Path) -> None:
    ledger = _device(tmp_path)
    rec = Recorder(Outbox.open(tmp_path / OUTBOX), identity.load(tmp_path), clock=Clock("synced"), boot="b")
    for _ in range(40):
        rec.record([ODO, FakeReading("event", {"event": "note", "detail": "x" * 3000})])
    rec.outbox.close()  # checkpointed into the database file, the WAL gone
    assert not (tmp_path / (OUTBOX + "-wal")).exists()
    size = (tmp_path / OUTBOX).stat().st_size
    os.truncate(tmp_path / OUTBOX, size - 4096 - 100)
    with pytest.raises(StorageError, match=f"{re.escape(str(tmp_path / OUTBOX))}: .*malformed"):
        _check(tmp_path / OUTBOX, ledger, complete=False, where="cut")
    (tmp_path / OUTBOX).write_bytes(b"SQLite format 3\0" + b"\xff" * 84)
    with pytest.raises(StorageError, match=f"{re.escape(str(tmp_path / OUTBOX))}: .*not a database"):
        Outbox.open(tmp_path / OUTBOX)


def test_an_outbox_whose_tip_is_not_its_last_record_is_refused(tmp_path: Path) -> None:
    rec = Recorder(Outbox.open(tmp_path / OUTBOX), identity.create(tmp_path), clock=Clock("synced"), boot="b")
    rec.record([ODO] * 3)
    rec.outbox._conn.execute("DELETE FROM records WHERE seq = 2")
    rec.outbox.close()
    with pytest.raises(StorageError,
                       match=r"outbox\.db: the file is damaged: 1 unsynced records between seq 1 and 3"):
        Outbox.open(tmp_path / OUTBOX)
    with sqlite3.connect(tmp_path / OUTBOX) as conn:  # nothing was appended to it
        assert conn.execute("SELECT seq FROM records").fetchall() == [(1,), (3,)]


# -- file modes -------------------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    state = tmp_path / "state"
    odo_agent = str(Path(sys.executable).parent / "odo-agent")
    done = subprocess.run([odo_agent, "init", "--state-dir", str(state), "--obd-port", "/dev/ttyUSB0",
                           "--broker", "mqtt://127.0.0.1:1883"],
                          capture_output=True, text=True, umask=0, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    old = os.umask(0)
    try:
        box = Outbox.open(state / OUTBOX)
        Recorder(box, identity.load(state), clock=Clock("synced"), boot="b").record([ODO])
        modes = {p.name: _mode(p) for p in [state, *state.iterdir()]}
        box.close()
        fresh = tmp_path / "fresh"
        fresh.mkdir(mode=0o700)
        Outbox.open(fresh / OUTBOX).close()
        modes["fresh/" + OUTBOX] = _mode(fresh / OUTBOX)
    finally:
        os.umask(old)
    assert modes == {"state": 0o700, "device.key": 0o600, "agent.toml": 0o600, "ui-pin.json": 0o600,
                     OUTBOX: 0o600,
                     OUTBOX + "-wal": 0o600, OUTBOX + "-shm": 0o600, "fresh/" + OUTBOX: 0o600}


def test_an_outbox_others_can_read_is_made_private(tmp_path: Path) -> None:
    Outbox.open(tmp_path / OUTBOX).close()
    os.chmod(tmp_path / OUTBOX, 0o644)
    box = Outbox.open(tmp_path / OUTBOX)
    box.set_state({"x": 1})
    assert (_mode(tmp_path / OUTBOX), _mode(tmp_path / (OUTBOX + "-wal"))) == (0o600, 0o600)
    box.close()
