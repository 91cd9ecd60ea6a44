"""Which unit of distance, km or mi, the backend shows a device's and a vehicle's figures in.

The fleet has a default (the ``display_unit`` setting, km unless set); a device may have its own
(``devices.display_unit``, set by ``odo-backend devices unit DEV km|mi|default``; NULL follows
the fleet's). A vehicle's unit is that of its approved device. Figures stay in metres in every
table; only what is shown changes.
"""

from __future__ import annotations

from backend.db import Database, Tx
from backend.errors import UnknownDevice
from common import units
from protocol.identity import DEV_RE

#: What ``devices unit`` takes: a unit, or ``default`` for the fleet's.
CHOICES = (*units.UNITS, "default")


def set_device_unit(db: Database, dev: str, unit: str | None) -> bool:
    """Set the device's own unit (None: follow the fleet's); False when it already was that."""
    if not DEV_RE.fullmatch(dev):
        raise UnknownDevice(f"no device {dev[:40]!r} (a device id is 32 lowercase hex characters)")
    if unit is not None:
        units.check_unit(unit)
    with db.write() as tx:
        row = tx.one("SELECT display_unit FROM devices WHERE dev = ?", (dev,))
        if row is None:
            raise UnknownDevice(f"no device {dev}")
        if row["display_unit"] == unit:
            return False
        tx.execute("UPDATE devices SET display_unit = ? WHERE dev = ?", (unit, dev))
    return True


def device_unit(tx: Tx, dev: str, default: str) -> str:
    """The device's own unit, else ``default`` (the fleet's)."""
    unit = tx.scalar("SELECT display_unit FROM devices WHERE dev = ?", (dev,))
    return units.check_unit(unit) if unit is not None else default


def vehicle_unit(tx: Tx, vin: str, default: str) -> str:
    """The unit of the vehicle's approved device when it has its own, else ``default``."""
    unit = tx.scalar("SELECT display_unit FROM devices WHERE vin = ? AND status = 'approved' "
                     "AND display_unit IS NOT NULL ORDER BY dev LIMIT 1", (vin,))
    return units.check_unit(unit) if unit is not None else default
