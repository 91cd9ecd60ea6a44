"""Jittered, capped exponential backoff for reconnecting (MQTT broker, OBD adapter)."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays that double from ``base_s`` up to ``cap_s``, each drawn uniformly from
    the upper half of the current step ("equal jitter"), so that a fleet of
    dongles coming back after a broker restart does not reconnect in lockstep,
    yet no delay is ever near zero."""

    def __init__(
        self, base_s: float = 1.0, cap_s: float = 60.0, *, factor: float = 2.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError("need 0 < base_s <= cap_s")
        self.base_s = base_s
        self.cap_s = cap_s
        self.factor = factor
        self._rand = rand
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt; each call counts one failure."""
        step = min(self.cap_s, self.base_s * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        return step / 2 + self._rand() * step / 2

    def reset(self) -> None:
        self.attempts = 0
