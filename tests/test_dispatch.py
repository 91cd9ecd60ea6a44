"""The ingest's dispatcher: each device's messages in order, one at a time; no device waits for
another while a worker is idle."""

from __future__ import annotations

import random
import threading
import time

import pytest

from backend.records.dispatch import Dispatcher


def test_each_keys_items_come_in_order_one_at_a_time_and_all_workers_serve() -> None:
    d = Dispatcher[int](capacity=10_000)
    rng = random.Random(4)
    sent: dict[str, list[int]] = {f"dev{k}": [] for k in range(12)}
    for n in range(3000):
        key = rng.choice(sorted(sent))
        sent[key].append(n)
        assert d.put(key, n, lambda: False)
    got: dict[str, list[int]] = {k: [] for k in sent}
    active: set[str] = set()
    overlaps: list[str] = []
    served: dict[str, int] = {}
    guard = threading.Lock()

    def worker(name: str) -> None:
        while (taken := d.take()) is not None:
            key, n = taken
            with guard:
                if key in active:
                    overlaps.append(key)
                active.add(key)
                served[name] = served.get(name, 0) + 1
            time.sleep(0.0001)
            with guard:
                active.discard(key)
                got[key].append(n)
            d.done(key)
            if d.queued() == 0 and sum(len(v) for v in got.values()) == 3000:
                d.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == sent
    assert overlaps == []
    assert len(served) == 4 and min(served.values()) > 100


def test_a_slow_device_never_holds_up_the_others() -> None:
    d = Dispatcher[int](capacity=100)
    release = threading.Event()
    order: list[str] = []

    def worker() -> None:
        while (taken := d.take()) is not None:
            key, _ = taken
            if key == "slow":
                release.wait(10)
            order.append(key)
            d.done(key)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for key in ["slow", "slow", "slow", "a", "b", "c", "a", "b"]:
        d.put(key, 0, lambda: False)
    deadline = time.monotonic() + 5
    while len(order) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(order) == ["a", "a", "b", "b", "c"]     # all of them while "slow" was in hand
    assert d.queued() == 2                                  # slow's next two wait for it, for no one else
    release.set()
    while len(order) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order.count("slow") == 3
    d.close()
    for t in threads:
        t.join(5)


def test_put_waits_for_room_and_gives_up_when_told_to_stop() -> None:
    d = Dispatcher[int](capacity=2)
    assert d.put("a", 1, lambda: False) and d.put("b", 2, lambda: False)
    stopping = threading.Event()
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(d.put("c", 3, stopping.is_set, poll_s=0.01)))
    t.start()
    time.sleep(0.1)
    assert t.is_alive() and d.queued() == 2              # full: the producer waits
    taken = d.take()
    assert taken == ("a", 1)
    t.join(2)
    assert result == [True] and d.queued() == 2          # room was made, it went in
    t = threading.Thread(target=lambda: result.append(d.put("d", 4, stopping.is_set, poll_s=0.01)))
    t.start()
    time.sleep(0.05)
    stopping.set()
    t.join(2)
    assert result == [True, False]
    assert d.close() == 2                                 # what waited is dropped, counted
    assert d.take() is None and not d.put("e", 5, lambda: False)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Dispatcher[int](0)


def test_take_many_takes_devices_in_line_within_the_count_and_the_budget() -> None:
    d = Dispatcher[int](capacity=100)
    for key, size in [("a", 10), ("a", 10), ("b", 30), ("c", 50), ("d", 5)]:
        d.put(key, size, lambda: False)
    first = d.take_many(8, lambda n: n, 45)
    assert first == [("a", 10), ("b", 30)]            # c would pass the budget; a's second waits for a
    assert d.take_many(8, lambda n: n, 45) == [("c", 50)]     # the first is taken whatever it weighs
    assert d.take_many(1, lambda n: n, 1000) == [("d", 5)]
    d.done("a")
    assert d.take_many(8, lambda n: n, 45) == [("a", 10)]
    d.close()
    assert d.take_many(8, lambda n: n, 45) == []
