"""Enrolment (docs/protocol.md §4.5): asking the backend to approve this device, and keeping its answer.

Three ways an enrolment goes out:

- The daemon, while not approved, sends its signed enrolment on every connect, so that
  ``odo-agent init --fleet-token`` plus ``run`` is enough (:meth:`Enroller.on_connect`).
- ``odo-agent enroll`` beside a running daemon does not connect itself (the broker takes one
  connection per client id): it leaves an ``enroll_request`` in the outbox, which the daemon's
  sync publishes, and waits for the answer the daemon stores (:func:`request_via_daemon`,
  :meth:`Enroller.serve`).
- ``odo-agent enroll`` with no daemon connects itself (:func:`agent.sync.enroll`), publishes,
  and waits as :class:`AnswerWait` decides.

Every answer (``approved``, ``pending``, ``rejected``) is kept in the outbox
(:data:`agent.state.ENROLLMENT`) for ``status``. The MQTT side lives in :mod:`agent.sync`, the
only module that speaks to the broker; this one decides what to send, when to stop waiting,
and what to keep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.buffer import Outbox
from agent.state import ENROLL_REQUEST, ENROLLMENT, EnrollAnswer, EnrollRequest
from common.clock import now_ms

log = logging.getLogger(__name__)

SERVE_EVERY_S = 0.5

Publish = Callable[[str], None]
"""Publishes a signed enrolment on the device's ``enroll`` topic."""


@dataclass(frozen=True)
class EnrollResult:
    status: str | None          # approved | pending | rejected | None (no answer)
    reason: str | None = None


def save_answer(outbox: Outbox, status: str, reason: str | None) -> None:
    ENROLLMENT.put(outbox, EnrollAnswer(status, reason, now_ms()))


class Enroller:
    """The daemon's side. ``sign(fleet_token)`` signs an enrolment (with the daemon's own token
    when None); with no ``sign``, the daemon only keeps the answers it receives."""

    def __init__(self, outbox: Outbox, sign: Callable[[str | None], str] | None) -> None:
        self.outbox = outbox
        self.sign = sign
        self._served_at = 0.0

    def on_connect(self, publish: Publish) -> None:
        """Send the enrolment unless approved: the backend answers with the current status."""
        if self.sign is None:
            return
        answer = ENROLLMENT.get(self.outbox)
        if answer is not None and answer.status == "approved":
            return
        publish(self.sign(None))
        log.info("not approved yet: enrolment sent")

    def serve(self, publish: Publish, now: float) -> None:
        """Send what ``odo-agent enroll`` asked for, if it did (checked every half second)."""
        if self.sign is None or now - self._served_at < SERVE_EVERY_S:
            return
        self._served_at = now
        request = ENROLL_REQUEST.get(self.outbox)
        if request is not None:
            publish(self.sign(request.fleet_token))
            ENROLL_REQUEST.put(self.outbox, None)
            log.info("enrolment sent, as asked by odo-agent enroll")

    def on_answer(self, status: str, reason: str | None) -> bool:
        """Keep the backend's answer; True when it newly approves the device."""
        before = ENROLLMENT.get(self.outbox)
        save_answer(self.outbox, status, reason)
        log.info("enrolment %s%s", status, f" ({reason})" if reason else "")
        return status == "approved" and (before is None or before.status != "approved")


def request_via_daemon(outbox: Outbox, wait_s: float, fleet_token: str | None) -> EnrollResult:
    """Ask the running daemon to send the enrolment; wait up to ``wait_s`` for its answer."""
    asked = now_ms()
    ENROLL_REQUEST.put(outbox, EnrollRequest(asked, fleet_token))
    deadline = time.monotonic() + max(wait_s, 1.0)
    answer: EnrollAnswer | None = None
    while time.monotonic() < deadline:
        got = ENROLLMENT.get(outbox)
        if got is not None and got.t >= asked:
            answer = got
            if got.status in ("approved", "rejected"):
                break
        time.sleep(0.2)
    return EnrollResult(answer.status, answer.reason) if answer else EnrollResult(None)


def request_pending(outbox: Outbox) -> bool:
    """Whether an ``enroll_request`` still waits for the daemon to send it."""
    return ENROLL_REQUEST.get(outbox) is not None


class AnswerWait:
    """``odo-agent enroll`` on its own connection: when to (re)publish, and when to stop.

    Publish at once, and again every ``republish_s`` while no fresh answer came. Stop at once on
    ``approved`` or ``rejected``; otherwise after ``wait_s`` with the last answer (``pending``),
    or ``status=None`` if none came. A retained answer from an earlier attempt counts only when
    no fresh one comes (a retained ``approved`` is final)."""

    def __init__(self, wait_s: float, republish_s: float, start: float) -> None:
        self.deadline = start + max(wait_s, 1.0)
        self.republish_s = republish_s
        self._published_at: float | None = None
        self._fresh: list[tuple[str, str | None]] = []
        self._retained: list[tuple[str, str | None]] = []

    def answer(self, status: str, reason: str | None, *, retained: bool) -> None:
        (self._retained if retained else self._fresh).append((status, reason))

    def publish_due(self, now: float) -> bool:
        last = self._published_at
        return last is None or (not self._fresh and now - last >= self.republish_s)

    def published(self, now: float) -> None:
        self._published_at = now

    def result(self, now: float) -> EnrollResult | None:
        """The answer to return now, or None to keep waiting."""
        final = [a for a in self._fresh if a[0] != "pending"]
        final += [a for a in self._retained if a[0] == "approved"]
        if final:
            return EnrollResult(*final[-1])
        if now >= self.deadline:
            answers = self._fresh or self._retained
            return EnrollResult(*answers[-1]) if answers else EnrollResult(None)
        return None
