"""Claiming this car for a driver (docs/protocol.md §4.7): the pairing code the driver typed on
the page, signed, sent, and the backend's answer kept.

The page (:mod:`agent.ui`, its own process) signs the claim with the device key and leaves it
in the outbox (:data:`agent.state.CLAIM_REQUEST`, :func:`request`); the daemon's sync publishes
it on ``odo/v1/<dev>/claim``, again after each reconnection, until the backend's answer to it
comes on the device's ``enrolled`` topic (:class:`Claimer`); the answer is kept
(:data:`agent.state.CLAIM_ANSWER`) for the page. Each key has one writer: a code typed while an
answer to the previous one is on its way replaces the request, and that answer is then set
aside. Sending one claim twice is harmless: the backend answers the same claim with its first
result and does nothing new.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.buffer import Outbox
from agent.state import CLAIM_ANSWER, CLAIM_REQUEST, ClaimAnswer, ClaimRequest
from common.clock import now_ms
from protocol import messages
from protocol.identity import SigningKey

log = logging.getLogger(__name__)

SERVE_EVERY_S = 0.5

Publish = Callable[[str], None]
"""Publishes a signed claim on the device's ``claim`` topic."""

#: What each refusal means to the driver, on the page.
REASONS = {
    "unknown_code": "that code is not one the portal gave; check it and type it again",
    "expired_code": "that code has expired; ask the portal for a new one",
    "used_code": "that code has been used already; ask the portal for a new one",
    "vehicle_taken": "this car is another driver's now; their claim must end first",
    "device_not_approved": "this dongle is not approved for a car yet",
    "too_many_attempts": "too many wrong codes; wait a quarter of an hour",
    "clock_off": "this dongle's clock is wrong; wait until it has synced the time",
    "bad_signature": "the backend did not take this dongle's signature",
    "bad_format": "the backend could not read the claim",
}


@dataclass(frozen=True)
class View:
    """The last claim typed on the page, and the backend's answer to it (None until it comes)."""

    request: ClaimRequest | None
    answer: ClaimAnswer | None


def request(outbox: Outbox, key: SigningKey, typed: str) -> ClaimRequest:
    """Sign a claim with the code ``typed`` and leave it for the daemon to send; a code that is
    not :data:`protocol.messages.CLAIM_CODE_LEN` characters of the code alphabet (case, spaces
    and dashes aside) is :class:`ValueError`."""
    code = messages.normalise_claim_code(typed)
    if code is None:
        raise ValueError(f"a pairing code is {messages.CLAIM_CODE_LEN} letters and digits, as the "
                         "driver's portal shows it")
    signed = messages.sign_claim(key, code, now_ms())
    req = ClaimRequest(messages.claim_id(signed), signed, now_ms())
    CLAIM_REQUEST.put(outbox, req)
    log.info("claim %s left for the daemon to send", req.id[:12])
    return req


def view(outbox: Outbox) -> View:
    req = CLAIM_REQUEST.get(outbox)
    answer = CLAIM_ANSWER.get(outbox)
    return View(req, answer if req is not None and answer is not None and answer.id == req.id else None)


class Claimer:
    """The daemon's side: publish the waiting claim once per connection, keep its answer."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._sent: str | None = None
        self._served_at = 0.0

    def on_connect(self) -> None:
        """A new connection: the waiting claim is sent again."""
        self._sent = None

    def serve(self, publish: Publish, now: float) -> None:
        """Publish the claim the page left, if it has no answer and this connection has not
        sent it (looked at every half second)."""
        if now - self._served_at < SERVE_EVERY_S:
            return
        self._served_at = now
        current = view(self.outbox)
        if current.request is None or current.answer is not None or current.request.id == self._sent:
            return
        publish(current.request.jws)
        self._sent = current.request.id
        log.info("claim %s sent", current.request.id[:12])

    def on_result(self, result: messages.ClaimResult) -> None:
        """Keep the backend's answer to the waiting claim (one to an earlier claim is set aside)."""
        req = CLAIM_REQUEST.get(self.outbox)
        if req is None or req.id != result.id:
            log.info("an answer to claim %s, which no longer waits: set aside", result.id[:12])
            return
        CLAIM_ANSWER.put(self.outbox, ClaimAnswer(result.id, result.status, result.reason, result.driver,
                                                  result.vin, result.valid_from, now_ms()))
        log.info("claim %s: %s%s", result.id[:12], result.status,
                 f" ({result.reason})" if result.reason else "")
