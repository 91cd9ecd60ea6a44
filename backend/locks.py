"""The advisory locks that order the backend's writers, across processes (PostgreSQL advisory
locks; SQLite's ``BEGIN IMMEDIATE`` already runs one writer at a time).

One device's batches are handled one at a time (its lock); the writers of one vehicle's
odometer, its rewards and its driver assignments one at a time (the vehicle's lock, taken
after the device's, in VIN order). A writer waits at most :data:`LOCK_WAIT_MS` for them.
Nothing takes a lock that all devices share: the transparency log's sequencer has its own
(:mod:`backend.transparency.translog`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from backend.db import Database, Tx


def device_lock_key(dev: str) -> int:
    """The advisory-lock key that serialises every writer of one device (60 bits of its id)."""
    try:
        return int(dev[:15], 16)
    except ValueError:
        return 0


#: How long a writer waits for a device's (and then its vehicles') lock held by another process:
#: past it, :class:`backend.errors.LockTimeout`. A process stopped in the middle of a transaction
#: (SIGSTOP, a debugger, a VM paused) thus holds up that one device's batches, which its agent
#: sends again, and never the writer's other work.
LOCK_WAIT_MS = 2000


def lock_device(db: Database, tx: Tx, dev: str) -> None:
    db.lock_key(tx, device_lock_key(dev), LOCK_WAIT_MS)


def vehicle_lock_key(vin: str) -> int:
    """The advisory-lock key that serialises the writers of one vehicle (60 bits)."""
    return int(hashlib.sha256(b"vehicle:" + vin.encode("ascii")).hexdigest()[:15], 16)


def lock_vehicles(db: Database, tx: Tx, vins: Iterable[str]) -> None:
    """Lock each vehicle a transaction touches, in one order for every process: no deadlock.
    Taken after the device's lock; two devices of one car are judged one after the other."""
    for vin in sorted(set(vins)):
        db.lock_key(tx, vehicle_lock_key(vin))
