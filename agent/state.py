"""The outbox's ``state`` table: every key, the type of its value, and how to read and write it.

The table (created by :mod:`agent.buffer`) maps a key to one JSON value. It is how the daemon
and the short-lived commands (``confirm``, ``status``, ``enroll``, ``remind``, ``ui``) talk to
each other, and what the daemon carries over a restart. No other module names a key: each is a
:class:`Key` here, read with ``KEY.get(store)`` and written with ``KEY.put(store, value)``; what
must be saved in the same transaction as records is passed as ``writes(KEY.entry(value), …)``.

=====================  =========================  ==================================  ======================
key                    value                      written by                          read by
=====================  =========================  ==================================  ======================
``tip``                :class:`Tip`               every append (``agent.buffer``)     the next append
``ack``                :class:`LastAck`           each ack (``agent.buffer``)         counts, status
``last_rejection``     :class:`LastRejection`     each ack; null once one moves on    status
``vin``                the VIN read last (str)    the daemon                          the daemon, commands
``vehicle``            ``Vehicle.snapshot()``     the daemon, with each record        the daemon on start
``live``               :class:`Live`              the daemon                          status, the UI
``clock_synced_boot``  a boot id (str)            the daemon, with ``clock_synced``   the daemon
``confirm_applied``    a seq (int)                the daemon                          the daemon
``confirmed``          :class:`Confirmed`         each confirmation                   status, confirm, UI
``confirmation_due``   :class:`ConfirmationDue`   ``remind``; null by a confirmation  none (status: confirmed)
``enrollment``         :class:`EnrollAnswer`      each answer (daemon or ``enroll``)  sync, enroll, status
``enroll_request``     :class:`EnrollRequest`     ``enroll`` beside a daemon          the daemon's sync
``claim_request``      :class:`ClaimRequest`      the UI's claim form                 the daemon's sync, UI
``claim_answer``       :class:`ClaimAnswer`       the daemon's sync                   the daemon's sync, UI
``sync``               :class:`Connection`        the daemon's sync                   status
=====================  =========================  ==================================  ======================

Encoding: compact JSON, object members in the order the dataclasses list their fields, which is
the order the agent has always written them in, so outbox files of earlier versions read
unchanged. A missing key reads as its default (None, or 0 / the genesis tip); reading is
lenient: a member that is missing or of another type reads as None (or its stated default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, NewType, Protocol, Self, TypeVar

from protocol.records import GENESIS

T = TypeVar("T")

Entry = tuple[str, object]
"""One key and its encoded value, made by :meth:`Key.entry`."""

Writes = NewType("Writes", dict[str, object])
"""State to save in one transaction (with the records of an append); made by :func:`writes`."""


class StateStore(Protocol):
    """Where the table lives: :class:`agent.buffer.Outbox`."""

    def state(self, key: str) -> object: ...
    def set_state(self, values: Mapping[str, object]) -> None: ...


def writes(*entries: Entry) -> Writes:
    return Writes(dict(entries))


def save(store: StateStore, values: Writes) -> None:
    """Save several keys at once (in one transaction)."""
    store.set_state(values)


class Key(Generic[T]):
    """A key of the table and the codec of its value."""

    def __init__(self, name: str, decode: Callable[[object], T], encode: Callable[[T], object]) -> None:
        self.name = name
        self._decode = decode
        self._encode = encode

    def __repr__(self) -> str:
        return f"Key({self.name!r})"

    def load(self, raw: object) -> T:
        """The value of a stored JSON value (None when the key is absent)."""
        return self._decode(raw)

    def get(self, store: StateStore) -> T:
        return self._decode(store.state(self.name))

    def entry(self, value: T) -> Entry:
        return self.name, self._encode(value)

    def put(self, store: StateStore, value: T) -> None:
        store.set_state(writes(self.entry(value)))


# -- lenient readers of stored JSON ----------------------------------------------------------------

def _obj(raw: object) -> Mapping[str, object] | None:
    return raw if isinstance(raw, dict) and raw else None


def _int(d: Mapping[str, object], key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str(d: Mapping[str, object], key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


# -- the values ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tip:
    """The last record appended: the next one has ``seq + 1`` and ``prev = id``."""

    seq: int = 0
    id: str = GENESIS

    def as_json(self) -> dict[str, object]:
        return {"seq": self.seq, "id": self.id}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_int(d, "seq") or 0, _str(d, "id") or GENESIS)


@dataclass(frozen=True)
class LastAck:
    """The highest ``through`` acknowledged, when the last ack came, and its balance."""

    through: int
    t: int | None
    balance: int | None          # milli-tokens, or None when the backend gave none

    def as_json(self) -> dict[str, object]:
        return {"through": self.through, "t": self.t, "balance": self.balance}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_int(d, "through") or 0, _int(d, "t"), _int(d, "balance"))


@dataclass(frozen=True)
class LastRejection:
    """The last rejection that did not take a seq (e.g. ``unknown_device``): the record waits."""

    seq: int | None
    reason: str | None
    t: int | None

    def as_json(self) -> dict[str, object]:
        return {"seq": self.seq, "reason": self.reason, "t": self.t}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_int(d, "seq"), _str(d, "reason"), _int(d, "t"))


@dataclass(frozen=True)
class Live:
    """The daemon's live view, for ``status`` and the driver's page."""

    odo_m: int | None
    src: str | None
    ignition: bool
    trip: Mapping[str, object] | None      # the trip in progress (``Vehicle.trip``)
    obd: str | None                        # the adapter's state
    error: str | None                      # the recorder's error state (e.g. a full disk)
    t: int | None                          # when it was taken

    def same_view(self, other: Live | None) -> bool:
        """Whether ``other`` shows the same, whenever it was taken."""
        return other is not None and self.as_json() | {"t": None} == other.as_json() | {"t": None}

    def as_json(self) -> dict[str, object]:
        return {"odo_m": self.odo_m, "src": self.src, "ignition": self.ignition,
                "trip": dict(self.trip) if self.trip is not None else None, "obd": self.obd,
                "error": self.error, "t": self.t}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        trip = _obj(d.get("trip"))
        return cls(_int(d, "odo_m"), _str(d, "src"), d.get("ignition") is True,
                   dict(trip) if trip is not None else None, _str(d, "obd"), _str(d, "error"), _int(d, "t"))


@dataclass(frozen=True)
class Confirmed:
    """The last confirmation the driver gave: the figure, the device's own then, the ISO week."""

    odo_m: int
    device_odo_m: int | None
    week: str
    t: int | None

    def as_json(self) -> dict[str, object]:
        return {"odo_m": self.odo_m, "device_odo_m": self.device_odo_m, "week": self.week, "t": self.t}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_int(d, "odo_m") or 0, _int(d, "device_odo_m"), _str(d, "week") or "", _int(d, "t"))


@dataclass(frozen=True)
class ConfirmationDue:
    """``odo-agent remind`` found no confirmation for ``week``."""

    week: str
    t: int | None

    def as_json(self) -> dict[str, object]:
        return {"week": self.week, "t": self.t}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_str(d, "week") or "", _int(d, "t"))


@dataclass(frozen=True)
class EnrollAnswer:
    """The backend's last answer to an enrolment: ``approved``, ``pending`` or ``rejected``."""

    status: str | None
    reason: str | None
    t: int

    def as_json(self) -> dict[str, object]:
        return {"status": self.status, "reason": self.reason, "t": self.t}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_str(d, "status"), _str(d, "reason"), _int(d, "t") or 0)


@dataclass(frozen=True)
class EnrollRequest:
    """``odo-agent enroll`` asks the running daemon to send an enrolment (with this token)."""

    t: int
    fleet_token: str | None = field(repr=False)

    def as_json(self) -> dict[str, object]:
        return {"t": self.t, "fleet_token": self.fleet_token}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_int(d, "t") or 0, _str(d, "fleet_token"))


@dataclass(frozen=True)
class ClaimRequest:
    """The driver typed a pairing code on the page: the signed claim (``jws``, whose SHA-256 hex
    is ``id``) for the daemon's sync to publish until it is answered."""

    id: str
    jws: str = field(repr=False)
    t: int

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "jws": self.jws, "t": self.t}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_str(d, "id") or "", _str(d, "jws") or "", _int(d, "t") or 0)


@dataclass(frozen=True)
class ClaimAnswer:
    """The backend's answer to the claim ``id``: ``claimed`` (``driver`` drives ``vin`` from
    ``valid_from``) or ``refused`` (``reason``); ``t`` is when it came."""

    id: str
    status: str | None
    reason: str | None
    driver: str | None
    vin: str | None
    valid_from: int | None
    t: int

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "status": self.status, "reason": self.reason, "driver": self.driver,
                "vin": self.vin, "valid_from": self.valid_from, "t": self.t}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_str(d, "id") or "", _str(d, "status"), _str(d, "reason"), _str(d, "driver"),
                   _str(d, "vin"), _int(d, "valid_from"), _int(d, "t") or 0)


@dataclass(frozen=True)
class Connection:
    """The daemon's broker connection: ``online``, ``offline`` or ``auth_refused`` (and why)."""

    state: str | None
    refusal: str | None
    t: int | None

    def as_json(self) -> dict[str, object]:
        return {"state": self.state, "refusal": self.refusal, "t": self.t}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Self:
        return cls(_str(d, "state"), _str(d, "refusal"), _int(d, "t"))


# -- codecs ----------------------------------------------------------------------------------------

class _Value(Protocol):
    def as_json(self) -> dict[str, object]: ...


V = TypeVar("V", bound=_Value)


def _value(name: str, from_json: Callable[[Mapping[str, object]], V]) -> Key[V | None]:
    """A key whose value is one of the dataclasses above, or null."""
    def decode(raw: object) -> V | None:
        d = _obj(raw)
        return from_json(d) if d is not None else None

    def encode(value: V | None) -> object:
        return value.as_json() if value is not None else None

    return Key(name, decode, encode)


def _optional_str(raw: object) -> str | None:
    return raw if isinstance(raw, str) else None


def _seq(raw: object) -> int:
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else 0


def _tip(raw: object) -> Tip:
    d = _obj(raw)
    return Tip.from_json(d) if d is not None else Tip()


def _snapshot(raw: object) -> dict[str, object] | None:
    d = _obj(raw)
    return dict(d) if d is not None else None


def _same(value: T) -> T:
    return value


# -- the keys --------------------------------------------------------------------------------------

TIP: Key[Tip] = Key("tip", _tip, Tip.as_json)
ACK = _value("ack", LastAck.from_json)
LAST_REJECTION = _value("last_rejection", LastRejection.from_json)
VIN: Key[str | None] = Key("vin", _optional_str, _same)
VEHICLE: Key[dict[str, object] | None] = Key("vehicle", _snapshot, _same)
LIVE = _value("live", Live.from_json)
CLOCK_SYNCED_BOOT: Key[str | None] = Key("clock_synced_boot", _optional_str, _same)
CONFIRM_APPLIED: Key[int] = Key("confirm_applied", _seq, _same)
CONFIRMED = _value("confirmed", Confirmed.from_json)
CONFIRMATION_DUE = _value("confirmation_due", ConfirmationDue.from_json)
ENROLLMENT = _value("enrollment", EnrollAnswer.from_json)
ENROLL_REQUEST = _value("enroll_request", EnrollRequest.from_json)
SYNC = _value("sync", Connection.from_json)
CLAIM_REQUEST = _value("claim_request", ClaimRequest.from_json)
CLAIM_ANSWER = _value("claim_answer", ClaimAnswer.from_json)

NAMES = frozenset(key.name for key in (
    TIP, ACK, LAST_REJECTION, VIN, VEHICLE, LIVE, CLOCK_SYNCED_BOOT, CONFIRM_APPLIED, CONFIRMED,
    CONFIRMATION_DUE, ENROLLMENT, ENROLL_REQUEST, SYNC, CLAIM_REQUEST, CLAIM_ANSWER,
))
"""Every key the agent uses."""
