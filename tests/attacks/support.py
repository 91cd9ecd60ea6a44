"""What the attack stories share: the backend under attack, reached through the store's own entry
point and counting each outcome in metrics as the ingest does (:class:`Target`); the same backend
running as an :class:`~backend.records.ingest.Ingest` on a real mosquitto (:func:`live`); and the
checks of what an attack leaves behind: the evidence it kept, and what it added to what was
stored (:func:`added`), every row stored before being still there as it was."""

from __future__ import annotations

import json
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from backend.db import Database
from backend.ledger import accounts, assignments
from backend.ledger.rules import Rules
from backend.metrics import Registry
from backend.records import store
from backend.records.ingest import Ingest
from backend.web import api_tokens
from backend.web.app import create_app
from backend.web.context import AppContext
from common.transport import BrokerConfig
from protocol import b64, canonical
from protocol.messages import Ack
from protocol.records import Record
from sim.broker import Broker, quiet_broker
from sim.devices import FLEET_TOKEN, T0, Dongle, batch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

#: The backend's clock during an attack: a day after the simulated devices start signing.
NOW = T0 + 86_400_000
#: The ``api_token`` setting of the API under attack (an operator's credential).
OPERATOR_TOKEN = "operator-token-of-the-attack-suite"


def dev_of(who: Dongle | str) -> str:
    return who.dev if isinstance(who, Dongle) else who


@dataclass
class Target:
    """The backend under attack: ``send`` hands a records message to ``store.process_batch`` as the
    ingest does for a message on the device's topic, and counts its outcomes in :attr:`metrics`."""

    db: Database
    rules: Rules
    metrics: Registry = field(default_factory=Registry)

    def send(self, topic: Dongle | str, *items: Record | str, now: int = NOW, **extra: Any) -> Ack:
        """Publish ``items`` as one records message on the topic of ``topic``; the ack."""
        result = store.process_batch(self.db, self.rules, dev_of(topic), batch(*items, **extra), now)
        self.metrics.count_records(result.outcomes)
        if result.refused is not None:
            self.metrics.count_refused("records", result.refused)
        return result.ack

    def counted(self, status: str, reason: str = "") -> int:
        """How many records the metrics counted with that outcome."""
        return self.metrics.records(status, reason)


def altered(record: Record, **changes: Any) -> str:
    """``record`` with fields of its payload changed, in canonical form, its signature kept."""
    header, payload, signature = record.jws.split(".")
    fields = {**json.loads(b64.decode(payload)), **changes}
    return ".".join([header, b64.encode(canonical.dumps(fields)), signature])


def reasons(ack: Ack) -> list[tuple[int | None, str]]:
    """The ack's rejections, as (seq, reason)."""
    return [(r.seq, r.reason) for r in ack.rejected]


def rejections(db: Database, who: Dongle | str) -> list[dict[str, Any]]:
    """The refused records kept for operators under a device's topic, oldest first."""
    return db.query("SELECT seq, reason, body FROM rejections WHERE dev = ? ORDER BY id", (dev_of(who),))


def forks(db: Database, who: Dongle | str) -> list[dict[str, Any]]:
    """The second records kept for seqs already taken, oldest first."""
    return db.query("SELECT seq, record_id, jws FROM forks WHERE dev = ? ORDER BY id", (dev_of(who),))


def device_row(db: Database, who: Dongle | str) -> dict[str, Any]:
    row = db.one("SELECT status, vin, flagged_vin, through, head_id, held_at, held_reason FROM devices "
                 "WHERE dev = ?", (dev_of(who),))
    assert row is not None, f"no device {dev_of(who)}"
    return row


def record_rows(db: Database, who: Dongle | str) -> list[tuple[int, str, str | None]]:
    """(seq, status, reason) of each record stored for a device."""
    rows = db.query("SELECT seq, status, reason FROM records WHERE dev = ? ORDER BY seq", (dev_of(who),))
    return [(int(r["seq"]), r["status"], r["reason"]) for r in rows]


def added(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """What was added between two :func:`tests.backend_helpers.snapshot` s, by table (only the
    tables that grew); asserts that every row stored before is still stored, unchanged. The
    devices' rows are left out: a device's head moves with every record it sends, which each
    story checks itself."""
    grown: dict[str, list[dict[str, Any]]] = {}
    for table, rows in before.items():
        if table == "devices":
            continue
        missing = [row for row in rows if row not in after[table]]
        assert missing == [], f"{table}: rows stored before were changed or removed: {missing}"
        new = [row for row in after[table] if row not in rows]
        if new:
            grown[table] = new
    return grown


@dataclass
class Live:
    """A backend ingest subscribed to a broker of its own, and that broker."""

    ingest: Ingest
    broker: Broker

    @property
    def metrics(self) -> Registry:
        return self.ingest.registry

    def counted(self, status: str, reason: str, n: int = 1, timeout: float = 5) -> bool:
        """Whether the ingest's metrics count ``n`` records with that outcome within ``timeout``
        (it counts a batch just after publishing its ack)."""
        return _soon(lambda: self.metrics.records(status, reason) == n, timeout)

    def refused(self, channel: str, reason: str, n: int = 1, timeout: float = 10) -> bool:
        """Whether the ingest's metrics count ``n`` messages of ``channel`` refused for ``reason``."""
        return _soon(lambda: self.metrics.refused(channel, reason) == n, timeout)


def _soon(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@contextmanager
def live(db_url: str, rules: Rules) -> Iterator[Live]:
    """The ingest of ``odo-backend run`` (its own database handle, the fleet token of the simulated
    devices, the backend's clock at :data:`NOW`) on a mosquitto of its own, subscribed."""
    broker = quiet_broker()
    try:
        name = f"odo-backend-attacks-{uuid.uuid4().hex[:8]}"
        config = BrokerConfig(broker.host, broker.port, client_id=name)
        ingest = Ingest(Database.open(db_url), rules, config, FLEET_TOKEN, registry=Registry(),
                        clock=lambda: NOW, workers=2)
        ingest.start()
        try:
            assert ingest.subscribed.wait(10), "the ingest did not subscribe"
            yield Live(ingest, broker)
        finally:
            ingest.stop()
    finally:
        broker.stop()


# -- the JSON API ----------------------------------------------------------------------------------

@contextmanager
def api(db: Database, rules: Rules) -> Iterator[TestClient]:
    """The backend's HTTP app on ``db``, credentials required, its clock at :data:`NOW`."""
    app = create_app(AppContext(db=db, rules=rules, api_token=OPERATOR_TOKEN, clock=lambda: NOW))
    with TestClient(app) as client:
        yield client


def driver_app(db: Database, driver: str) -> dict[str, str]:
    """A driver of the fleet and the headers of their phone app (an API token for that driver)."""
    assignments.add_driver(db, driver, driver.title(), T0)
    token, _ = api_tokens.add(db, f"{driver}-app", "driver", driver, None, T0)
    return {"Authorization": f"Bearer {token}"}


def partner_app(db: Database) -> dict[str, str]:
    """The headers of a partner's shop (an API token of role partner)."""
    token, _ = api_tokens.add(db, "shop", "partner", None, None, T0)
    return {"Authorization": f"Bearer {token}"}


def balance(db: Database, account: str) -> int:
    with db.read() as tx:
        return accounts.balance(tx, account)
