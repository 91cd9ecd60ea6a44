"""Pushing the log's checkpoints to its witnesses (c2sp.org/tlog-witness; docs/log.md).

Each configured witness is sent the latest checkpoint with a consistency proof from the size
it last cosigned (``POST <witness>/add-checkpoint``); the cosignature it answers with is kept
(table ``log_cosignatures``) and served with the checkpoint. A witness that has cosigned
another size answers 409 with that size: the push is made again once from there. Every other
failure is kept as the witness's ``last_error`` and logged; the next checkpoint tries again.

:class:`Pusher` runs in ``odo-backend run``: it signs a checkpoint when the log has grown, at
most once per interval, and pushes it to every witness (one that fails is tried again later and
later, up to once a minute, so that a witness that is down costs neither time nor log lines).
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from backend.db import Database
from backend.transparency import translog
from protocol import witness as tw
from protocol.errors import BadFormat

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0
#: A witness that keeps failing is tried again after 2, 4, 8 … intervals, at most this long.
MAX_BACKOFF_MS = 60_000
#: The largest answer read from a witness: a few cosignature lines.
MAX_ANSWER_BYTES = 16 * 1024


class WitnessError(Exception):
    """A witness did not cosign; the message says what it answered."""


@dataclass(frozen=True)
class Pushed:
    witness: str
    size: int
    line: str            # the cosignature line kept


def _known_size(db: Database, url: str) -> int:
    value = db.one("SELECT size FROM log_witnesses WHERE witness = ?", (url,))
    return 0 if value is None else int(value["size"])


def _remember(db: Database, url: str, size: int, error: str | None, now_ms: int) -> None:
    with db.write() as tx:
        if not tx.insert_ignore("log_witnesses", {"witness": url, "size": size, "last_error": error,
                                                  "updated_at": now_ms}, ("witness",)):
            tx.execute("UPDATE log_witnesses SET size = ?, last_error = ?, updated_at = ? WHERE witness = ?",
                       (size, error, now_ms, url))


def _post(url: str, body: bytes, timeout: float) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url.rstrip("/") + tw.PATH, data=body, method="POST",
                                     headers={"Content-Type": "text/plain; charset=utf-8"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - a configured URL
            return int(response.status), response.headers.get("Content-Type", ""), \
                response.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.headers.get("Content-Type", ""), exc.read(MAX_ANSWER_BYTES + 1)


def _attempt(db: Database, url: str, cp: dict[str, object], old: int, timeout: float) -> tuple[int, bytes]:
    size = int(str(cp["size"]))
    with db.read() as tx:
        proof = translog.consistency_proof(tx, old, size) if 0 < old < size else []
        row = tx.one("SELECT note FROM log_checkpoints WHERE size = ?", (size,))
    assert row is not None
    body = tw.encode_add_checkpoint(old, proof, str(row["note"]).encode("utf-8"))
    status, kind, answer = _post(url, body, timeout)
    if len(answer) > MAX_ANSWER_BYTES:
        raise WitnessError(f"witness {url}: an answer of more than {MAX_ANSWER_BYTES} bytes")
    if status == 409 and kind.split(";")[0].strip() == tw.SIZE_CONTENT_TYPE:
        try:
            return status, str(tw.parse_size(answer)).encode("ascii")
        except BadFormat as exc:
            raise WitnessError(f"witness {url}: 409 with {exc}") from None
    return status, answer


def push(db: Database, url: str, now_ms: int, *, timeout: float = TIMEOUT_S) -> Pushed | None:
    """Have ``url`` cosign the latest checkpoint (None when it already has, or there is none);
    raise :class:`WitnessError` when it does not."""
    cp = translog.latest_checkpoint(db)
    if cp is None:
        return None
    size = int(cp["size"])
    with db.read() as tx:
        have = tx.one("SELECT line FROM log_cosignatures WHERE size = ? AND witness = ?", (size, url))
    if have is not None:
        return None
    old = _known_size(db, url)
    try:
        for _ in range(2):
            if old > size:
                raise WitnessError(f"witness {url} has cosigned a tree of {old} entries, larger than this "
                                   f"log's latest checkpoint ({size}): it has seen another history")
            try:
                status, answer = _attempt(db, url, cp, old, timeout)
            except OSError as exc:
                raise WitnessError(f"witness {url}: unreachable ({exc})") from None
            if status == 409 and answer.isdigit():
                old = int(answer)
                continue
            if status != 200:
                said = answer.decode("utf-8", "replace").strip()[:200]
                raise WitnessError(f"witness {url}: HTTP {status} {said}".rstrip())
            try:
                lines = tw.parse_cosignatures(answer)
            except BadFormat as exc:
                raise WitnessError(f"witness {url}: {exc}") from None
            if not lines:
                raise WitnessError(f"witness {url}: answered 200 with no cosignature")
            line = lines[0].line
            with db.write() as tx:
                tx.insert_ignore("log_cosignatures", {"size": size, "witness": url, "line": line,
                                                      "created_at": now_ms}, ("size", "witness"))
            _remember(db, url, size, None, now_ms)
            log.info("witness %s cosigned the checkpoint of %d entries", url, size)
            return Pushed(url, size, line)
        raise WitnessError(f"witness {url}: answered 409 twice (it now says {old})")
    except WitnessError as exc:
        _remember(db, url, old, str(exc), now_ms)
        raise


def push_all(db: Database, urls: Sequence[str], now_ms: int, *, timeout: float = TIMEOUT_S) -> list[str]:
    """Push the latest checkpoint to every witness; return the failures (one message each)."""
    failures = []
    for url in urls:
        try:
            push(db, url, now_ms, timeout=timeout)
        except WitnessError as exc:
            log.warning("%s", exc)
            failures.append(str(exc))
    return failures


class Pusher:
    """Sign a checkpoint when the log has grown, then push it to the witnesses; every
    ``interval_ms`` in a thread of its own, until :meth:`stop`."""

    def __init__(self, db: Database, urls: Sequence[str], clock: Callable[[], int],
                 interval_ms: int = 1000) -> None:
        self.db = db
        self.urls = tuple(urls)
        self.clock = clock
        self.interval_ms = interval_ms
        self._backoff: dict[str, tuple[int, int]] = {}      # url -> (failures in a row, next try)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoints", daemon=True)

    def start(self) -> None:
        """Forget the state of witnesses no longer configured (their cosignatures stay), then run."""
        with self.db.write() as tx:
            known = [str(r["witness"]) for r in tx.query("SELECT witness FROM log_witnesses")]
            for url in known:
                if url not in self.urls:
                    tx.execute("DELETE FROM log_witnesses WHERE witness = ?", (url,))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=TIMEOUT_S * 2)

    def once(self) -> None:
        translog.checkpoint(self.db, self.clock())
        now = self.clock()
        for url in self.urls:
            failures, next_try = self._backoff.get(url, (0, 0))
            if now < next_try:
                continue
            try:
                push(self.db, url, now)
            except WitnessError as exc:
                failures += 1
                wait_ms = min(MAX_BACKOFF_MS, self.interval_ms * 2 ** min(failures, 16))
                self._backoff[url] = (failures, now + wait_ms)
                log.warning("%s (failure %d; next try in %d s)", exc, failures, wait_ms // 1000)
            else:
                self._backoff.pop(url, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_ms / 1000):
            try:
                self.once()
            except Exception:   # noqa: BLE001 - a database hiccup must not end the checkpoints
                log.exception("signing or pushing a checkpoint failed; trying again")
                self.db.close()      # a fresh connection next time; a healthy one is kept
        self.db.close()              # this thread's connection
