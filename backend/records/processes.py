"""Ingest processes: each worker thread of ``odo-backend run`` has the batches of records it takes
verified and stored by a process of its own, which answers with what came of each.

Python runs one thread of a process at a time (the GIL). Checking a signature lets go of it, but
getting it back means waiting for the thread that holds it, up to a switch interval (5 ms) for a
check of 50 µs: threads that check signatures beside a thread running Python mostly wait. In
processes of their own, the batches are parsed, checked and stored on every core; the thread
that sent one waits on a pipe, and the process that received it only routes messages, acks and
integrates the log.

    child = BatchProcess(Setup.of(db, rules, evidence), "odo-ingest-0")
    result = child.process(dev, body, now_ms)      # what store.process_batch(...) returns
    child.close()

The process (``python -c "from backend.records.processes import main; main()"``) reads
frames (:mod:`protocol.frames`) on its stdin: a :class:`Setup`, then lists of batches, each
``(dev, body, now_ms)``; it verifies the batches of a list, stores them together (on SQLite in
one transaction of one commit, each in a savepoint of its own: :func:`store_all`) and writes a
list of the same length, a :class:`~backend.records.store.BatchResult` or a :class:`Failure` for
each, on its stdout. It stops when its stdin closes. It ignores SIGINT and SIGTERM (a
terminal's Ctrl-C and systemd send them to every process of the service): its parent stops it
once the batch in hand is answered.
A failure there is raised here as it would have been in the thread: :class:`LockTimeout`,
:class:`StorageUnavailable` for a database that cannot store, :class:`BatchFailed` for anything
else (logged with its traceback by the process, on the same stderr). A process that dies or
answers nothing readable fails its batch (:class:`BatchFailed`; the agent sends it again) and
is started again for the next one, at most once a second; meanwhile, or when none can be
started, the thread stores the batch itself.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Literal

from backend import storage
from backend.config import LOG_FORMAT
from backend.db import Database
from backend.errors import BackendError, LockTimeout, StorageUnavailable
from backend.ledger.contracts import LiveBook
from backend.records import store
from backend.records.evidence import EvidenceLimits
from protocol.frames import FrameError, read_frame, write_frame

log = logging.getLogger(__name__)

#: The largest answer taken from a process (an ack names at most a batch's rejections).
MAX_ANSWER = 4 * 1024 * 1024
#: A process that died is started again at most this often; meanwhile the thread stores itself.
RESTART_S = 1.0
#: What a process runs (not ``-m``: pickled classes must come from this module, not ``__main__``).
_CHILD = "from backend.records.processes import main; main()"
#: How long :meth:`BatchProcess.close` waits for the process to stop once its stdin is closed.
STOP_WAIT_S = 10.0


#: A batch as handed to a process: the device whose topic it came on, the message, its receipt.
Batch = tuple[str, bytes, int]


class BatchFailed(BackendError):
    """The ingest process failed the batch, or died with it."""


@dataclass(frozen=True)
class Failure:
    """What the process answers when storing failed: ``kind`` says which exception to raise."""

    kind: Literal["lock_timeout", "storage", "error"]
    message: str
    reason: str | None = None                 # why storage is unavailable (kind "storage")

    def exception(self) -> Exception:
        if self.kind == "lock_timeout":
            return LockTimeout(self.message)
        if self.kind == "storage":
            return StorageUnavailable(self.reason or "storage unavailable", self.message)
        return BatchFailed(self.message)


@dataclass(frozen=True)
class Setup:
    """What a process needs to store batches as a running backend's thread would: the database,
    whose rule book it reads as :class:`LiveBook` does (every ``reload_s``, and in each batch's
    transaction), the evidence limits, the log level."""

    db_url: str
    reload_s: float
    evidence: EvidenceLimits
    log_level: int

    @classmethod
    def of(cls, db: Database, rules: LiveBook, evidence: EvidenceLimits) -> Setup:
        return cls(db.url, rules.reload_s, evidence, logging.getLogger().getEffectiveLevel())


class BatchProcess:
    """One worker thread's ingest process, started at its first batch. Not thread-safe: one
    thread uses it."""

    def __init__(self, setup: Setup, name: str) -> None:
        self.setup, self.name = setup, name
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = -RESTART_S
        self._db: Database | None = None          # this thread's, while no process runs
        self._book: LiveBook | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def process(self, dev: str, body: bytes, now_ms: int) -> store.BatchResult:
        """What :func:`store.process_batch` returns for this batch, from the process (or from this
        thread when no process can run it now)."""
        answer = self.process_many([(dev, body, now_ms)])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def process_many(self, batches: Sequence[Batch]) -> list[store.BatchResult | Exception]:
        """Each ``(dev, body, now_ms)`` of ``batches`` verified, then all of them stored together
        (on SQLite, in one transaction of one commit, each in a savepoint of its own): what
        :func:`store.process_batch` returns for each, or the exception it raises."""
        proc = self._proc if self._proc is not None else self._start()
        if proc is None:
            if self._db is None or self._book is None:
                self._db = Database.open(self.setup.db_url)
                self._book = _rules(self.setup, self._db)
            return [a.exception() if isinstance(a, Failure) else a
                    for a in store_all(self._db, self._book, self.setup.evidence, batches)]
        assert proc.stdin is not None and proc.stdout is not None
        try:
            write_frame(proc.stdin, pickle.dumps(list(batches), pickle.HIGHEST_PROTOCOL))
            frame = read_frame(proc.stdout, MAX_ANSWER)
            if frame is None:
                raise FrameError("it stopped")
            answers = pickle.loads(frame)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            self._lost(f"{exc}")
            failed = BatchFailed(f"{self.name}: the ingest process failed with this batch ({exc})")
            return [failed for _ in batches]
        if not isinstance(answers, list) or len(answers) != len(batches) or not all(
                isinstance(a, store.BatchResult | Failure) for a in answers):
            self._lost(f"answered a {type(answers).__name__}")
            wrong = BatchFailed(f"{self.name}: the ingest process answered a {type(answers).__name__}")
            return [wrong for _ in batches]
        return [a.exception() if isinstance(a, Failure) else a for a in answers]

    def _start(self) -> subprocess.Popen[bytes] | None:
        if time.monotonic() - self._started_at < RESTART_S:
            return None
        self._started_at = time.monotonic()
        root = str(Path(__file__).resolve().parents[2])        # where backend/ and protocol/ are
        path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
        try:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, self.name],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env={**os.environ, "PYTHONPATH": path})
        except OSError as exc:
            log.error("%s: cannot start an ingest process (%s): this thread stores its batches itself",
                      self.name, exc)
            return None
        log.debug("%s: ingest process %d started", self.name, proc.pid)
        self._proc = proc
        assert proc.stdin is not None
        try:
            write_frame(proc.stdin, pickle.dumps(self.setup, pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            self._lost(f"{exc}")
            return None
        return proc

    def _lost(self, why: str) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        status = proc.wait()
        _close(proc)
        log.error("%s: the ingest process %d failed (%s, exit status %s); starting another", self.name,
                  proc.pid, why, status)

    def close(self) -> None:
        """Stop the process once it has answered what it was given."""
        proc, self._proc = self._proc, None
        if self._db is not None:
            self._db.close()
        if proc is None:
            return
        _close(proc)
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s: the ingest process %d did not stop within %.0f s: killed", self.name, proc.pid,
                        STOP_WAIT_S)
            proc.kill()
            proc.wait()


def _close(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def _rules(setup: Setup, db: Database) -> LiveBook:
    return LiveBook(db, reload_s=setup.reload_s)


def store_all(db: Database, rules: LiveBook, evidence: EvidenceLimits,
              batches: Sequence[Batch]) -> list[store.BatchResult | Failure]:
    """Each batch prepared (parsed, its signatures checked), then those prepared stored together
    (:meth:`Database.write_each`); what came of each."""
    prepared: list[store.Prepared | Failure] = []
    for dev, body, now_ms in batches:
        try:
            prepared.append(store.prepare(db, dev, body, now_ms))
        except Exception as exc:  # noqa: BLE001 - answered, and raised again in the thread that asked
            prepared.append(_failure(db, dev, exc))
    ready = [p for p in prepared if isinstance(p, store.Prepared)]
    stored = iter(db.write_each([partial(p.store_in, db, rules=rules, limits=evidence) for p in ready]))
    out: list[store.BatchResult | Failure] = []
    for p in prepared:
        if isinstance(p, Failure):
            out.append(p)
            continue
        answer = next(stored)
        out.append(_failure(db, p.dev, answer) if isinstance(answer, Exception) else answer)
    return out


def _failure(db: Database, dev: str, exc: Exception) -> Failure:
    if isinstance(exc, LockTimeout):
        return Failure("lock_timeout", str(exc))
    reason = storage.failure(exc)
    if reason is None:
        log.error("%s: failed to store a batch", dev, exc_info=exc)
        return Failure("error", f"{type(exc).__name__}: {exc}")
    db.close()                              # a failed commit may have left it in its transaction
    return Failure("storage", str(exc), reason)


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """The process: the setup, then batches (a list at a time) until ``inp`` ends."""
    frame = read_frame(inp)
    if frame is None:
        return
    setup = pickle.loads(frame)
    if not isinstance(setup, Setup):
        raise SystemExit(f"an ingest process takes a Setup first, not a {type(setup).__name__}")
    logging.basicConfig(level=setup.log_level, format=LOG_FORMAT)
    db = Database.open(setup.db_url)
    rules = _rules(setup, db)
    try:
        while (frame := read_frame(inp)) is not None:
            answers = store_all(db, rules, setup.evidence, pickle.loads(frame))
            write_frame(out, pickle.dumps(answers, pickle.HIGHEST_PROTOCOL))
    finally:
        db.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # stopped by its parent, batch in hand answered
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                                       # a stray print goes to the log, not the answers
    serve(sys.stdin.buffer, out)

