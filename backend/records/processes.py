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
frames (:mod:`protocol.frames`) on its stdin: a :class:`Setup`, then ``(dev, body, now_ms)``
for each batch; it writes a
:class:`~backend.records.store.BatchResult` or a :class:`Failure` for each on its stdout, and
stops when its stdin closes. It ignores SIGINT and SIGTERM (a terminal's Ctrl-C and systemd send
them to every process of the service): its parent stops it once the batch in hand is answered.
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
from dataclasses import dataclass
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

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def process(self, dev: str, body: bytes, now_ms: int) -> store.BatchResult:
        """What :func:`store.process_batch` returns for this batch, from the process (or from this
        thread when no process can run it now)."""
        proc = self._proc if self._proc is not None else self._start()
        if proc is None:
            return self._here(dev, body, now_ms)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            write_frame(proc.stdin, pickle.dumps((dev, body, now_ms), pickle.HIGHEST_PROTOCOL))
            answer = read_frame(proc.stdout, MAX_ANSWER)
            if answer is None:
                raise FrameError("it stopped")
            result = pickle.loads(answer)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            self._lost(f"{exc}")
            raise BatchFailed(f"{self.name}: the ingest process failed with this batch ({exc})") from None
        if isinstance(result, Failure):
            raise result.exception()
        if not isinstance(result, store.BatchResult):
            self._lost(f"answered a {type(result).__name__}")
            raise BatchFailed(f"{self.name}: the ingest process answered a {type(result).__name__}")
        return result

    def _here(self, dev: str, body: bytes, now_ms: int) -> store.BatchResult:
        """The batch stored by this thread (no process runs now)."""
        if self._db is None:
            self._db = Database.open(self.setup.db_url)
        db = self._db
        return store.process_batch(db, _rules(self.setup, db), dev, body, now_ms, self.setup.evidence)

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


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """The process: the setup, then a batch at a time until ``inp`` ends."""
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
            dev, body, now_ms = pickle.loads(frame)
            answer: store.BatchResult | Failure
            try:
                answer = store.process_batch(db, rules, dev, body, now_ms, setup.evidence)
            except LockTimeout as exc:
                answer = Failure("lock_timeout", str(exc))
            except Exception as exc:  # noqa: BLE001 - answered, and raised again in the thread that asked
                reason = storage.failure(exc)
                if reason is None:
                    log.exception("%s: failed to store a batch", dev)
                    answer = Failure("error", f"{type(exc).__name__}: {exc}")
                else:
                    answer = Failure("storage", str(exc), reason)
                    db.close()                  # a failed commit may have left it in its transaction
            write_frame(out, pickle.dumps(answer, pickle.HIGHEST_PROTOCOL))
    finally:
        db.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # stopped by its parent, batch in hand answered
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                                       # a stray print goes to the log, not the answers
    serve(sys.stdin.buffer, out)

