"""Messages waiting for the ingest's workers: each device's in the order they came, one at a
time, and any idle worker takes the next device that has one.

A device's messages are handled one after the other (a batch's ``through`` follows the one
before), but no device waits for another: a worker that finishes a message puts its device at
the back of the line if more of its messages wait, and takes whichever device is next. Nothing
is tied to a worker, so a worker kept long by one device (a slow database, a lock another
process holds) never leaves another's devices waiting while the other workers sit idle.

``put`` waits while ``capacity`` messages are waiting (besides those in hand): the MQTT Receive
Maximum already keeps the broker from sending more, this is for a broker that would not.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Dispatcher(Generic[T]):
    """Per-key FIFO queues served by several workers, one message of a key at a time."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: {capacity}, must be at least 1")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting: dict[str, collections.deque[T]] = {}
        self._line: collections.deque[str] = collections.deque()   # keys with a message, none in hand
        self._in_hand: set[str] = set()
        self._queued = 0
        self._closed = False

    def put(self, key: str, item: T, stop: Callable[[], bool], poll_s: float = 0.2) -> bool:
        """Queue ``item`` after ``key``'s others; False (not queued) if ``stop()`` became true or
        the dispatcher was closed while it waited for room."""
        with self._changed:
            while self._queued >= self.capacity and not self._closed:
                if stop():
                    return False
                self._changed.wait(poll_s)
            if self._closed:
                return False
            waiting = self._waiting.get(key)
            if waiting is None:
                waiting = self._waiting[key] = collections.deque()
                if key not in self._in_hand:
                    self._line.append(key)
            waiting.append(item)
            self._queued += 1
            self._changed.notify_all()
            return True

    def take(self) -> tuple[str, T] | None:
        """The next message of the first device in line (it is then in hand until :meth:`done`);
        None once the dispatcher is closed."""
        taken = self.take_many(1, lambda _: 0, 0)
        return taken[0] if taken else None

    def take_many(self, most: int, weigh: Callable[[T], int], budget: int) -> list[tuple[str, T]]:
        """The next message of the first device in line, and of the devices after it while there
        are at most ``most`` and their ``weigh`` adds up to at most ``budget`` (each device then
        in hand until :meth:`done`); [] once the dispatcher is closed."""
        with self._changed:
            while not self._line and not self._closed:
                self._changed.wait()
            if self._closed:
                return []
            out: list[tuple[str, T]] = []
            weight = 0
            while self._line and len(out) < most:
                key = self._line[0]
                waiting = self._waiting[key]
                weight += weigh(waiting[0])
                if out and weight > budget:
                    break
                self._line.popleft()
                out.append((key, waiting.popleft()))
                if not waiting:
                    del self._waiting[key]
                self._in_hand.add(key)
                self._queued -= 1
            self._changed.notify_all()
            return out

    def done(self, key: str) -> None:
        """``key``'s message in hand is handled: its next one, if any, goes to the back of the line."""
        with self._changed:
            self._in_hand.discard(key)
            if key in self._waiting:
                self._line.append(key)
                self._changed.notify_all()

    def close(self) -> int:
        """Wake every worker (each :meth:`take` then returns None) and drop what waits; how many
        messages were dropped."""
        with self._changed:
            self._closed = True
            dropped, self._queued = self._queued, 0
            self._waiting.clear()
            self._line.clear()
            self._changed.notify_all()
            return dropped

    def queued(self) -> int:
        """Messages waiting, besides those in hand."""
        with self._lock:
            return self._queued
